// batch.cu -- the device side of a training step's data: counter-based random numbers, and the
// batch gathered from a dataset that lives on the GPU, augmented and normalized in one launch.
//
// What it computes
//   philox4x32_10(counter, key): Salmon et al.'s Philox4x32 with 10 rounds (Random123's
//     philox4x32_10, its known-answer vectors in tests/test_cuda_batch.py): four 32-bit words,
//     a pure function of a 128-bit counter and a 64-bit key. No state: the same (counter, key)
//     gives the same words on any thread, in any launch, captured in a CUDA graph or not.
//   philox_uniform:  out[i] = uniform in [0, 1) from the words of counter (i, c1, c2, c3):
//     float: (w0 >> 8) * 2^-24; double: ((w0 >> 5) * 2^26 + (w1 >> 6)) * 2^-53 -- exact, never 1.
//   gather_augment_normalize: x[b, h, w, c] for the batch rows b of one step. Row b is sample
//     order[p] of the dataset, p = step * batch + b its position in the epoch; its draws are the
//     words of counter (p, epoch, 1, 0) under key (seed), so they depend on (seed, epoch, step, b)
//     alone. Then, as cnn_gpu.data.Augmentation does it on the host: mirrored left-right when
//     hflip and w0 < 2^31 (probability 1/2), then shifted by (dy, dx) = (w1, w2) * (2s+1) / 2^32
//     - s, uniform in [-s, s], pixels shifted in being 0 (background); and normalized as
//     cnn_gpu.data.normalize does it: ((T)v * scale - mean[c]) * inv_std[c], scale = T(1/255),
//     each operation rounded on its own (no fused multiply-add), so the values are those of the
//     NumPy code bit for bit.
//   gather_labels: y[b] = labels[order[step * batch + b]].
//
// Layout
//   images (N, H, W, C) uint8, C-contiguous; order (N,) and labels (N,) long long; step a single
//   int on the device (the step of the epoch, advanced by the caller between steps, inside the
//   graph) and epoch a single unsigned int on the device (set before each epoch): a graph replays
//   its launches with the arguments they were captured with, so what changes between steps and
//   epochs is read from memory; x (rows, H, W, C) of T = float | double, rows <= batch; mean,
//   inv_std (C,) of T.
//
// How the work is divided
//   Every kernel is a grid-stride loop over its output's flat index (one thread per element,
//   64-bit indices; any blockDim and gridDim work): consecutive threads write consecutive
//   channels and pixels, so the stores are coalesced, and the reads of one image are gathered
//   from L2. Each thread of gather_augment_normalize recomputes its row's four words: ten
//   rounds of two 32x32-bit multiplies, cheaper than a pass to store them. Integer arithmetic
//   only; no atomics; every output element written once.

// Random123's round multipliers and Weyl key increments.
#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

struct PhiloxWords {
    unsigned int w[4];
};

__device__ __forceinline__ void mul_hi_lo(unsigned int a, unsigned int b, unsigned int& hi, unsigned int& lo)
{
    const unsigned long long product = (unsigned long long)a * (unsigned long long)b;
    hi = (unsigned int)(product >> 32);
    lo = (unsigned int)product;
}

// One round on counter (c0, c1, c2, c3) with key (k0, k1).
__device__ __forceinline__ void philox_round(unsigned int c[4], unsigned int k0, unsigned int k1)
{
    unsigned int hi0, lo0, hi1, lo1;
    mul_hi_lo(PHILOX_M0, c[0], hi0, lo0);
    mul_hi_lo(PHILOX_M1, c[2], hi1, lo1);
    const unsigned int n0 = hi1 ^ c[1] ^ k0;
    const unsigned int n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
}

__device__ __forceinline__ PhiloxWords philox4x32_10(unsigned int c0, unsigned int c1, unsigned int c2,
                                                     unsigned int c3, unsigned int k0, unsigned int k1)
{
    unsigned int c[4] = {c0, c1, c2, c3};
    philox_round(c, k0, k1);
    for (int r = 1; r < 10; ++r) {  // the key advances by the Weyl increments before each later round
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
        philox_round(c, k0, k1);
    }
    PhiloxWords out;
    for (int j = 0; j < 4; ++j) out.w[j] = c[j];
    return out;
}

// Uniform in [0, 1) from the words, exact in T (see the header).
__device__ __forceinline__ float unit_uniform(const PhiloxWords& r, float)
{
    return (float)(r.w[0] >> 8) * 5.9604644775390625e-08f;  // 2^-24
}
__device__ __forceinline__ double unit_uniform(const PhiloxWords& r, double)
{
    const unsigned long long bits = ((unsigned long long)(r.w[0] >> 5) << 26) | (unsigned long long)(r.w[1] >> 6);
    return (double)bits * 1.1102230246251565e-16;  // 2^-53
}

// Each operation rounded on its own, as NumPy computes it (nvcc would otherwise fuse a * b - c).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

// An integer uniform in [-s, s] from a word: floor(word * (2s + 1) / 2^32) - s.
__device__ __forceinline__ int uniform_shift(unsigned int word, int s)
{
    return (int)(((unsigned long long)word * (unsigned long long)(2 * s + 1)) >> 32) - s;
}

// out (n,): uniforms from counters (i, c1, c2, c3), key (k0, k1).
template <typename T>
__global__ void philox_uniform(T* __restrict__ out, long long n, unsigned int k0, unsigned int k1,
                               unsigned int c1, unsigned int c2, unsigned int c3)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const PhiloxWords r = philox4x32_10((unsigned int)i, c1, c2, c3, k0, k1);
        out[i] = unit_uniform(r, T(0));
    }
}

// images (N, H, W, C) uint8, order (N,), step (1,) -> x (rows, H, W, C); total = rows * H * W * C.
template <typename T>
__global__ void gather_augment_normalize(const unsigned char* __restrict__ images,
                                         const long long* __restrict__ order, const int* __restrict__ step,
                                         T* __restrict__ x, long long total, int batch, int H, int W, int C,
                                         int max_shift, int hflip, unsigned int k0, unsigned int k1,
                                         const unsigned int* __restrict__ epoch, T scale,
                                         const T* __restrict__ mean, const T* __restrict__ inv_std)
{
    const long long first = (long long)step[0] * batch;  // the step's first position in the epoch
    const unsigned int e = epoch[0];
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int c = (int)(i % C);
        const long long pixel = i / C;
        const int w = (int)(pixel % W);
        const long long row_h = pixel / W;
        const int h = (int)(row_h % H);
        const long long b = row_h / H;
        const long long p = first + b;
        int r = h, s = w;
        if (max_shift > 0 || hflip) {
            const PhiloxWords draws = philox4x32_10((unsigned int)p, e, 1u, 0u, k0, k1);
            r = h - (max_shift > 0 ? uniform_shift(draws.w[1], max_shift) : 0);  // out[h, w] = in[h - dy, w - dx]
            s = w - (max_shift > 0 ? uniform_shift(draws.w[2], max_shift) : 0);
            if (hflip && draws.w[0] < 0x80000000u) s = W - 1 - s;              // the mirror came first
        }
        T v = T(0);
        if (r >= 0 && r < H && s >= 0 && s < W) {
            const long long n = order[p];
            v = (T)images[((n * H + r) * W + s) * C + c];
        }
        x[i] = mul_rn(sub_rn(mul_rn(v, scale), mean[c]), inv_std[c]);
    }
}

// labels (N,), order (N,), step (1,) -> y (rows,)
template <typename L>
__global__ void gather_labels(const L* __restrict__ labels, const long long* __restrict__ order,
                              const int* __restrict__ step, L* __restrict__ y, int rows, int batch)
{
    const long long first = (long long)step[0] * batch;
    for (int b = blockIdx.x * blockDim.x + threadIdx.x; b < rows; b += gridDim.x * blockDim.x)
        y[b] = labels[order[first + b]];
}
