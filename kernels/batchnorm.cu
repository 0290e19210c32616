// batchnorm.cu -- the per-channel reductions of batch normalization.
//
// What it computes (x, dy viewed as (M, C), M = N*H*W rows, C channels)
//   forward:  mean[c] = sum_m x[m, c] / M
//             var[c]  = sum_m (x[m, c] - mean[c])^2 / M           (biased)
//             Each thread summarizes chunks of 8 of its values with sums shifted by the
//             chunk's first value, then merges chunks, threads, and blocks with Chan's
//             pairwise (Welford) merge, so the result stays accurate when |mean| >> std.
//   backward: sum_dy[c]      = sum_m dy[m, c]
//             sum_dy_xhat[c] = inv_std[c] * sum_m dy[m, c] * (x[m, c] - mean[c])
//             (= sum_m dy * x_hat), one pass over dy and x.
//   The elementwise parts (normalize, the dx formula) live in cnn_gpu/cuda/batchnorm.py.
//
// Layout
//   x, dy (M, C) C-contiguous, T = float | double; mean, inv_std, outputs (C,) T.
//   Partials (stage 1 -> stage 2) are (P, C) C-contiguous, P = gridDim.x of stage 1;
//   part_n (P, C) long long.
//
// How the work is divided
//   Stage 1 (`*_partial`): blockDim = (32, 8) exactly (BN_LANES x BN_ROWS).
//     A block column blockIdx.y owns a tile of CW = min(C, 32) consecutive channels.
//     Lane l of a warp reads channel blockIdx.y*CW + l % CW of row offset l / CW, so one
//     warp reads R = 32 / CW whole rows side by side (C < 32) or 32 consecutive channels
//     of one row (C >= 32): its loads are one contiguous run of memory either way.
//     Warp-rows are dealt out round-robin over the 8 warps of a block and the P blocks of
//     gridDim.x (grid-stride over M, 64-bit row indices), so P can be chosen to fill
//     every SM whatever C is. Each block then merges its 8 * R per-thread results for each
//     channel in a fixed order through shared memory and writes one partial per channel.
//   Stage 2 (`*_finish`): 1-D grid, one thread per channel (grid-stride), merges the P
//     partials of its channel in order b = 0 .. P-1; loads are coalesced along C.
//   No float atomics anywhere, and the order of every sum depends only on (M, C, P):
//   the results are bit-for-bit reproducible for a given launch configuration.

constexpr int BN_LANES = 32;  // blockDim.x of stage 1: one warp across channels
constexpr int BN_ROWS = 8;    // blockDim.y of stage 1: warps per block
// Blocks per SM that each stage-1 kernel's register budget must allow (__launch_bounds__);
// cnn_gpu/cuda/batchnorm.py sizes its grids with the same numbers. Mean/var needs more
// registers (8 loads in flight plus a division per chunk): 4 x 256 threads, <= 64 registers.
constexpr int BN_MEAN_VAR_MIN_BLOCKS = 4;
constexpr int BN_GRAD_SUMS_MIN_BLOCKS = 8;  // 8 x 256 = 2048 threads, <= 32 registers

// Which channel and rows a stage-1 thread reads.
struct ChannelTile {
    int c;          // channel
    int j;          // channel within the tile, 0 <= j < cw
    int cw;         // channels per tile, min(C, 32)
    int rows;       // rows one warp reads side by side, 32 / cw
    bool active;    // false for the lanes past the last channel (or past rows * cw)
    long long row;  // first row
    long long step; // row stride of the grid-stride loop
};

__device__ __forceinline__ ChannelTile channel_tile(int C)
{
    ChannelTile t;
    t.cw = C < BN_LANES ? C : BN_LANES;
    t.rows = BN_LANES / t.cw;
    const int lane = threadIdx.x;
    const int sub = lane / t.cw;
    t.j = lane % t.cw;
    t.c = blockIdx.y * t.cw + t.j;
    t.active = sub < t.rows && t.c < C;
    t.row = ((long long)blockIdx.x * BN_ROWS + threadIdx.y) * t.rows + sub;
    t.step = (long long)gridDim.x * BN_ROWS * t.rows;
    return t;
}

// Chan et al.: fold (nb, mean_b, m2_b) into (n, mean, m2). Empty sides are no-ops.
// N is int inside a thread (its count fits: a thread reads at most M / 8 rows of a tensor
// that fits in device memory) and long long across threads and blocks.
template <typename N, typename T>
__device__ __forceinline__ void welford_merge(N& n, T& mean, T& m2, N nb, T mean_b, T m2_b)
{
    if (nb == 0) return;
    if (n == 0) {
        n = nb;
        mean = mean_b;
        m2 = m2_b;
        return;
    }
    const N nab = n + nb;
    const T d = mean_b - mean;
    const T fb = (T)nb / (T)nab;
    mean += d * fb;
    m2 += m2_b + d * d * (T)n * fb;
    n = nab;
}

// Statistics of a chunk of k values v[0..k) from sums shifted by its first value:
// m2 = S2 - S1^2 / k with S1 = sum(v - v0), S2 = sum((v - v0)^2). Shifting by a member of
// the chunk bounds the cancellation: S2 = m2 + k (mean - v0)^2 and (mean - v0)^2 <= m2, so
// S2 <= (1 + k) * m2 and m2's relative rounding error is O(k * eps) however large |mean| is
// against the spread. Chunks are then merged with Chan's formula.
template <typename T>
__device__ __forceinline__ void chunk_stats(T v0, T s1, T s2, T inv_k, T& mean, T& m2)
{
    mean = v0 + s1 * inv_k;
    m2 = s2 - s1 * s1 * inv_k;
}

// x (M, C) -> part_n, part_mean, part_m2 (gridDim.x, C)
template <typename T>
__global__ void __launch_bounds__(BN_LANES * BN_ROWS, BN_MEAN_VAR_MIN_BLOCKS)
channel_mean_var_partial(const T* __restrict__ x, long long M, int C,
                         long long* __restrict__ part_n, T* __restrict__ part_mean,
                         T* __restrict__ part_m2)
{
    if (blockDim.x != BN_LANES || blockDim.y != BN_ROWS) __trap();  // shared arrays below
    __shared__ long long s_n[BN_ROWS][BN_LANES];
    __shared__ T s_mean[BN_ROWS][BN_LANES];
    __shared__ T s_m2[BN_ROWS][BN_LANES];

    // Values per chunk: 8 loads in flight per thread, and 1/8 is exact. Declared here, inside the
    // template, because a namespace-scope constant used only by templates is an unreferenced
    // variable to nvcc's host pass (warning #177).
    constexpr int BN_CHUNK = 8;
    const ChannelTile t = channel_tile(C);
    int n = 0;
    T mean = T(0), m2 = T(0);
    if (t.active) {
        const T* p = x + t.c;
        long long r = t.row;
        // Full chunks: BN_CHUNK loads in flight, then shifted sums and one merge.
        for (; r + (BN_CHUNK - 1) * t.step < M; r += BN_CHUNK * t.step) {
            T v[BN_CHUNK];
#pragma unroll
            for (int u = 0; u < BN_CHUNK; ++u) v[u] = p[(r + u * t.step) * C];
            T s1 = T(0), s2 = T(0);
#pragma unroll
            for (int u = 1; u < BN_CHUNK; ++u) {
                const T d = v[u] - v[0];
                s1 += d;
                s2 += d * d;
            }
            T cmean, cm2;
            chunk_stats(v[0], s1, s2, T(1) / T(BN_CHUNK), cmean, cm2);
            welford_merge(n, mean, m2, BN_CHUNK, cmean, cm2);
        }
        // The last, partial chunk (fewer than BN_CHUNK rows left for this thread).
        if (r < M) {
            const T v0 = p[r * C];
            int k = 1;
            T s1 = T(0), s2 = T(0);
            for (r += t.step; r < M; r += t.step, ++k) {
                const T d = p[r * C] - v0;
                s1 += d;
                s2 += d * d;
            }
            T cmean, cm2;
            chunk_stats(v0, s1, s2, T(1) / (T)k, cmean, cm2);
            welford_merge(n, mean, m2, k, cmean, cm2);
        }
    }
    s_n[threadIdx.y][threadIdx.x] = n;
    s_mean[threadIdx.y][threadIdx.x] = mean;
    s_m2[threadIdx.y][threadIdx.x] = m2;
    __syncthreads();

    // One thread per channel of the tile merges warp rows, then row offsets, in order.
    if (threadIdx.y == 0 && threadIdx.x < t.cw && t.c < C) {
        long long bn = 0;
        T bmean = T(0), bm2 = T(0);
        for (int ty = 0; ty < BN_ROWS; ++ty) {
            for (int s = 0; s < t.rows; ++s) {
                const int l = s * t.cw + t.j;
                welford_merge(bn, bmean, bm2, s_n[ty][l], s_mean[ty][l], s_m2[ty][l]);
            }
        }
        const long long o = (long long)blockIdx.x * C + t.c;
        part_n[o] = bn;
        part_mean[o] = bmean;
        part_m2[o] = bm2;
    }
}

// part_* (parts, C) -> mean, var (C,)
template <typename T>
__global__ void channel_mean_var_finish(const long long* __restrict__ part_n,
                                        const T* __restrict__ part_mean,
                                        const T* __restrict__ part_m2, int parts, int C,
                                        T* __restrict__ mean, T* __restrict__ var)
{
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < C; c += gridDim.x * blockDim.x) {
        long long n = 0;
        T m = T(0), m2 = T(0);
        for (int b = 0; b < parts; ++b) {
            const long long o = (long long)b * C + c;
            welford_merge(n, m, m2, part_n[o], part_mean[o], part_m2[o]);
        }
        mean[c] = m;
        // n = M > 0 (checked by the caller); rounding can leave m2 a hair below 0 when the
        // spread is ~0: clamp, but let a NaN through.
        var[c] = m2 < T(0) ? T(0) : m2 / (T)n;
    }
}

// dy, x (M, C), mean (C,) -> part_dy, part_dyxc (gridDim.x, C):
// sums of dy and of dy * (x - mean) over this block's rows.
template <typename T>
__global__ void __launch_bounds__(BN_LANES * BN_ROWS, BN_GRAD_SUMS_MIN_BLOCKS)
channel_grad_sums_partial(const T* __restrict__ dy, const T* __restrict__ x,
                          const T* __restrict__ mean, long long M, int C,
                          T* __restrict__ part_dy, T* __restrict__ part_dyxc)
{
    if (blockDim.x != BN_LANES || blockDim.y != BN_ROWS) __trap();  // shared arrays below
    __shared__ T s_dy[BN_ROWS][BN_LANES];
    __shared__ T s_dyxc[BN_ROWS][BN_LANES];

    const ChannelTile t = channel_tile(C);
    T sum_dy = T(0), sum_dyxc = T(0);
    if (t.active) {
        const T mu = mean[t.c];
        const T* pd = dy + t.c;
        const T* px = x + t.c;
        long long r = t.row;
        for (; r + t.step < M; r += 2 * t.step) {
            const T d0 = pd[r * C];
            const T x0 = px[r * C];
            const T d1 = pd[(r + t.step) * C];
            const T x1 = px[(r + t.step) * C];
            sum_dy += d0;
            sum_dyxc += d0 * (x0 - mu);
            sum_dy += d1;
            sum_dyxc += d1 * (x1 - mu);
        }
        for (; r < M; r += t.step) {
            const T d = pd[r * C];
            sum_dy += d;
            sum_dyxc += d * (px[r * C] - mu);
        }
    }
    s_dy[threadIdx.y][threadIdx.x] = sum_dy;
    s_dyxc[threadIdx.y][threadIdx.x] = sum_dyxc;
    __syncthreads();

    if (threadIdx.y == 0 && threadIdx.x < t.cw && t.c < C) {
        T bdy = T(0), bdyxc = T(0);
        for (int ty = 0; ty < BN_ROWS; ++ty) {
            for (int s = 0; s < t.rows; ++s) {
                const int l = s * t.cw + t.j;
                bdy += s_dy[ty][l];
                bdyxc += s_dyxc[ty][l];
            }
        }
        const long long o = (long long)blockIdx.x * C + t.c;
        part_dy[o] = bdy;
        part_dyxc[o] = bdyxc;
    }
}

// part_dy, part_dyxc (parts, C), inv_std (C,) -> sum_dy, sum_dy_xhat (C,)
template <typename T>
__global__ void channel_grad_sums_finish(const T* __restrict__ part_dy,
                                         const T* __restrict__ part_dyxc,
                                         const T* __restrict__ inv_std, int parts, int C,
                                         T* __restrict__ sum_dy, T* __restrict__ sum_dy_xhat)
{
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < C; c += gridDim.x * blockDim.x) {
        T s = T(0), sx = T(0);
        for (int b = 0; b < parts; ++b) {
            const long long o = (long long)b * C + c;
            s += part_dy[o];
            sx += part_dyxc[o];
        }
        sum_dy[c] = s;
        sum_dy_xhat[c] = sx * inv_std[c];
    }
}
