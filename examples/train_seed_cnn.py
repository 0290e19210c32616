"""Train the seed CNN on Fashion-MNIST with a plain epoch loop: the training step written out.

    python examples/train_seed_cnn.py    # prints the train loss and test accuracy after each epoch

`cnn-gpu train` does the same with validation, checkpoints, resume and plots.
"""
import numpy as np

from cnn_gpu import SGD, seed_cnn
from cnn_gpu.data import BatchIterator, compute_norm_stats, load_dataset, normalize
from cnn_gpu.functional import softmax_cross_entropy

EPOCHS, BATCH_SIZE = 5, 64

train = load_dataset("fashion-mnist", "train")  # images (60000, 28, 28, 1) uint8, labels (60000,)
test = load_dataset("fashion-mnist", "test")    # images (10000, 28, 28, 1) uint8
stats = compute_norm_stats(train.images)        # mean/std of the *training* images, used for both
test_x = normalize(test.images, stats)          # (10000, 28, 28, 1) float32

model = seed_cnn(num_classes=10)                # conv32-pool-conv64-pool-dense128-dense10
print(model.summary((28, 28, 1)))
optimizer = SGD(model.parameters(), lr=0.02, momentum=0.9)
batches = BatchIterator(train.images, train.labels, BATCH_SIZE, shuffle=True, seed=0,
                        transform=lambda x: normalize(x, stats))

for epoch in range(1, EPOCHS + 1):
    model.train()
    losses = []
    for x, y in batches:                         # one epoch: x (64, 28, 28, 1), y (64,)
        logits = model.forward(x)                # (64, 10)
        loss, dlogits = softmax_cross_entropy(logits, y)
        model.backward(dlogits)                  # fills every parameter's .grad
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))

    model.eval()                                 # (batch norm would use its running statistics)
    predictions = np.concatenate([model.forward(test_x[i:i + 1000]).argmax(axis=1)
                                  for i in range(0, len(test_x), 1000)])
    accuracy = (predictions == test.labels).mean()
    print(f"epoch {epoch}: train loss {np.mean(losses):.4f}, test accuracy {accuracy:.4f}")
