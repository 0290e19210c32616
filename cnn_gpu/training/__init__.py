"""Training: fit() runs the epochs; evaluate() and the metrics report on a split.

    from cnn_gpu.training import fit, evaluate, TrainingDiverged
"""
from .errors import DeviceOutOfMemory, TrainingDiverged, is_out_of_memory
from .evaluate import confusion_matrix, evaluate, per_class_accuracy
from .loop import FitResult, fit

__all__ = ["DeviceOutOfMemory", "FitResult", "TrainingDiverged", "confusion_matrix", "evaluate",
           "fit", "is_out_of_memory", "per_class_accuracy"]
