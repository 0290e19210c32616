// maxpool2d.cu -- 2-D max pooling, forward and backward, channels-last.
//
// What it computes
//   forward:  y[n, oh, ow, c]      = max over the window of x (padded positions are -inf)
//             argmax[n, oh, ow, c] = kh * KW + kw of that maximum, counted row-major over the
//                                    whole window, padded positions included
//   backward: dx[n, ih, iw, c]     = sum of dy[n, oh, ow, c] over the windows whose argmax
//                                    is this input position (positions in the padding drop out)
//   Tie rule (the same as numpy.argmax over the flattened window): the FIRST maximum wins,
//   and a NaN counts as the maximum (the first NaN wins).
//
// Layout (all arrays C-contiguous, channels last)
//   x, dx        (N, H, W, C)        T = float | double
//   y, dy        (N, OH, OW, C)      T
//   argmax       (N, OH, OW, C)      I = unsigned char (KH*KW <= 256) | int
//   OH = (H + 2*PH - KH) / SH + 1, OW likewise; the caller guarantees PH <= KH/2, PW <= KW/2,
//   so every window holds at least one real input position.
//
// How the work is divided
//   A 1-D grid of 1-D blocks walks the flat output (forward, backward_scatter) or flat input
//   (backward) with a grid-stride loop, one element per thread per step. Index arithmetic is
//   of type Idx: unsigned int when every index fits in 32 bits (the caller checks), else
//   unsigned long long; 64-bit division is emulated in software and made these kernels
//   instruction-bound, so the 32-bit version is the one that normally runs. The flat index runs
//   fastest over C, so the 32 threads of a warp touch 32 consecutive channels of the same pixel:
//   every load and store is coalesced. Any blockDim (a multiple of 32) and gridDim.x work.
//   The backward pass gathers: each input element visits, in a fixed order (oh, then ow,
//   ascending), the few windows that cover it and adds dy where that window's argmax points
//   here. Overlapping windows (stride < pool) therefore need no atomics and the result is
//   bit-for-bit deterministic.
//   backward_scatter is for windows that cannot overlap (stride >= pool): one thread per
//   output writes its whole window (dy at the argmax, 0 elsewhere), so each dx element is
//   written at most once -- a quarter of the gather's index arithmetic for 2x2 windows. The
//   caller zero-fills dx first when the windows do not cover every input position.

template <typename T> struct NegInf;
template <> struct NegInf<float> {
    __device__ __forceinline__ static float value() { return -__int_as_float(0x7f800000); }
};
template <> struct NegInf<double> {
    __device__ __forceinline__ static double value() {
        return -__longlong_as_double(0x7ff0000000000000LL);
    }
};

// IEEE a > b, subnormals included. CuPy compiles with -ftz=true, under which a plain float
// comparison flushes subnormal operands to zero: two different subnormals would tie and
// numpy.argmax's choice would be lost. Doubles are never flushed.
__device__ __forceinline__ bool greater(float a, float b)
{
    unsigned int r;
    asm("{\n\t.reg .pred p;\n\tsetp.gt.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(r) : "f"(a), "f"(b));
    return r != 0;
}
__device__ __forceinline__ bool greater(double a, double b) { return a > b; }

// Split the flat index i of a C-contiguous (N, A, B, C) array into (n, a, b, c).
template <typename Idx>
__device__ __forceinline__ void split_nabc(Idx i, int A, int B, int C, Idx& n, int& a, int& b, int& c)
{
    const Idx nab = i / C;
    c = (int)(i - nab * C);
    const Idx na = nab / B;
    b = (int)(nab - na * B);
    n = na / A;
    a = (int)(na - n * A);
}

// x (N, H, W, C) -> y (N, OH, OW, C), argmax (N, OH, OW, C); total = N * OH * OW * C
template <typename T, typename I, typename Idx>
__global__ void max_pool2d_forward(const T* __restrict__ x, T* __restrict__ y,
                                   I* __restrict__ argmax, Idx total,
                                   int H, int W, int C, int OH, int OW,
                                   int KH, int KW, int SH, int SW, int PH, int PW)
{
    const T neg_inf = NegInf<T>::value();
    const Idx step = (Idx)gridDim.x * blockDim.x;
    for (Idx i = (Idx)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        Idx n;
        int oh, ow, c;
        split_nabc(i, OH, OW, C, n, oh, ow, c);
        const int h0 = oh * SH - PH;  // window origin in input coordinates (may be < 0)
        const int w0 = ow * SW - PW;

        T best = neg_inf;  // padded positions are -inf, so starting here with k = 0 ...
        int best_k = 0;    // ... gives numpy's answer when every value is -inf
        for (int kh = 0; kh < KH; ++kh) {
            const int ih = h0 + kh;
            const bool row_in = ih >= 0 && ih < H;
            for (int kw = 0; kw < KW; ++kw) {
                const int iw = w0 + kw;
                const T v = (row_in && iw >= 0 && iw < W)
                                ? x[((n * H + (Idx)ih) * W + (Idx)iw) * C + c]
                                : neg_inf;
                // Strictly greater keeps the first maximum; the first NaN beats any number
                // and no later value (not even a NaN) replaces it.
                if (greater(v, best) || (v != v && best == best)) {
                    best = v;
                    best_k = kh * KW + kw;
                }
            }
        }
        y[i] = best;
        argmax[i] = (I)best_k;
    }
}

// dy (N, OH, OW, C), argmax (N, OH, OW, C) -> dx (N, H, W, C); total = N * H * W * C
template <typename T, typename I, typename Idx>
__global__ void max_pool2d_backward(const T* __restrict__ dy, const I* __restrict__ argmax,
                                    T* __restrict__ dx, Idx total,
                                    int H, int W, int C, int OH, int OW,
                                    int KH, int KW, int SH, int SW, int PH, int PW)
{
    const Idx step = (Idx)gridDim.x * blockDim.x;
    for (Idx i = (Idx)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        Idx n;
        int ih, iw, c;
        split_nabc(i, H, W, C, n, ih, iw, c);
        const int hp = ih + PH;  // position in padded coordinates, >= 0
        const int wp = iw + PW;

        // Windows oh cover hp when oh*SH <= hp <= oh*SH + KH - 1.
        const int oh_lo = hp - KH + 1 <= 0 ? 0 : (hp - KH + 1 + SH - 1) / SH;
        const int oh_hi = min(hp / SH, OH - 1);
        const int ow_lo = wp - KW + 1 <= 0 ? 0 : (wp - KW + 1 + SW - 1) / SW;
        const int ow_hi = min(wp / SW, OW - 1);

        T acc = T(0);
        for (int oh = oh_lo; oh <= oh_hi; ++oh) {
            const int kh = hp - oh * SH;  // 0 <= kh < KH
            for (int ow = ow_lo; ow <= ow_hi; ++ow) {
                const int kw = wp - ow * SW;  // 0 <= kw < KW
                const Idx o = ((n * OH + (Idx)oh) * OW + (Idx)ow) * C + c;
                if ((int)argmax[o] == kh * KW + kw) {
                    acc += dy[o];
                }
            }
        }
        dx[i] = acc;
    }
}

// Windows that cannot overlap (SH >= KH, SW >= KW): dy, argmax (N, OH, OW, C) -> dx (N, H, W, C),
// one thread per output writing its window. total = N * OH * OW * C. Positions outside every
// window are not written: the caller zero-fills dx when there are any.
template <typename T, typename I, typename Idx>
__global__ void max_pool2d_backward_scatter(const T* __restrict__ dy, const I* __restrict__ argmax,
                                            T* __restrict__ dx, Idx total,
                                            int H, int W, int C, int OH, int OW,
                                            int KH, int KW, int SH, int SW, int PH, int PW)
{
    const Idx step = (Idx)gridDim.x * blockDim.x;
    for (Idx i = (Idx)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        Idx n;
        int oh, ow, c;
        split_nabc(i, OH, OW, C, n, oh, ow, c);
        const int h0 = oh * SH - PH;
        const int w0 = ow * SW - PW;
        const int k = (int)argmax[i];
        const T g = dy[i];
        for (int kh = 0; kh < KH; ++kh) {
            const int ih = h0 + kh;
            if (ih < 0 || ih >= H) continue;
            for (int kw = 0; kw < KW; ++kw) {
                const int iw = w0 + kw;
                if (iw < 0 || iw >= W) continue;
                dx[((n * H + (Idx)ih) * W + (Idx)iw) * C + c] = (kh * KW + kw == k) ? g : T(0);
            }
        }
    }
}
