// maxpool2d.cu -- 2-D max pooling, forward and backward, channels-last: PyTorch's max_pool2d
// (kernel, stride, padding, dilation, ceil mode) and its gradient.
//
// What it computes
//   Window (oh, ow) reads its taps (kh, kw), kh < KH, kw < KW, at the input positions
//       ih = oh*SH - PH + kh*DH,   iw = ow*SW - PW + kw*DW;
//   a tap outside the input -- in the padding, or past it in a ceil-mode window -- reads -inf.
//   forward:  y[n, oh, ow, c]      = max over the window's taps of x[n, ih, iw, c]
//             argmax[n, oh, ow, c] = the tap k = kh * KW + kw of that maximum, counted row-major
//                                    over the whole window, taps outside the input included
//   backward: dx[n, ih, iw, c]     = sum of dy[n, oh, ow, c] over the windows whose argmax tap is
//                                    this input position (one outside the input drops its dy),
//                                    added by ascending tap k, as the NumPy code adds them
//   Tie rule (the same as numpy.argmax over the flattened window): the FIRST maximum wins,
//   and a NaN counts as the maximum (the first NaN wins).
//
// Layout (all arrays C-contiguous, channels last)
//   x, dx        (N, H, W, C)        T = float | double
//   y, dy        (N, OH, OW, C)      T
//   argmax       (N, OH, OW, C)      I = unsigned char (KH*KW <= 256) | int
//   OH, OW come from the caller (cnn_gpu.geometry.output_size, floor or ceil mode): every
//   window starts inside the input or its top/left padding. A window may still read no input
//   position at all (dilated taps that straddle a small input): its y is -inf, its argmax 0,
//   and its dy drops out, as in the NumPy code.
//
// How the work is divided
//   A 1-D grid of 1-D blocks walks the flat output (forward, backward_scatter) or flat input
//   (backward) with a grid-stride loop. One step of a thread handles V consecutive channels
//   of one pixel (a "channel vector"): the flat index i runs over (n, a, b, C/V), and element
//   offsets are i * V. V = 1 is the general path; V = 4 (float) or 2 (double) moves 16 bytes
//   per load and store (argmax: V bytes or V ints), and the caller picks it only when
//   C % V == 0 and every pointer is aligned to V elements. Both conditions together keep every
//   vector aligned: a vector starts at element pixel * C + cv * V, a multiple of V.
//   Why vectors: the float32 kernels were bound by per-element integer work (splitting the
//   flat index takes three 32-bit divisions, plus window bounds), not by bytes; a vector
//   pays that work once for V elements. The max and the argmax are still computed per lane
//   with the same comparison, so the results are bit for bit those of V = 1.
//   Index arithmetic is of type Idx: unsigned int when every index fits in 32 bits (the caller
//   checks), else unsigned long long; 64-bit division is emulated in software and made these
//   kernels instruction-bound, so the 32-bit version is the one that normally runs. The flat
//   index runs fastest over the channel vectors, so the threads of a warp touch consecutive
//   channels of the same pixel(s): every load and store is coalesced. Any blockDim (a multiple
//   of 32) and gridDim.x work. Dilation costs no division when DH = DW = 1.
//   The backward pass gathers: each input channel vector visits the few windows whose taps
//   read it, last window first -- a later window reads it at an earlier tap, so the dy arrive
//   by ascending tap k -- and adds dy where that window's argmax points here. Overlapping
//   windows (stride < dilated kernel) therefore need no atomics, and the result is
//   bit-for-bit deterministic.
//   backward_scatter is for windows that cannot overlap (stride >= dilated kernel DH*(KH-1)+1,
//   and across): one thread per output vector writes its whole window (dy at the argmax, 0
//   elsewhere), so each dx element is written at most once -- a quarter of the gather's index
//   arithmetic for 2x2 windows. The caller zero-fills dx first when the windows do not cover
//   every input position.

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

// V consecutive elements of type E, aligned to their whole size, so that one load or store
// of a Pack is one vector instruction (ld/st .v4.f32, .v2.f64, .v4.u8, ...). With V = 1 it
// is a plain scalar access.
template <typename E, int V>
struct alignas(sizeof(E) * V) Pack {
    E lane[V];
};

// p must be aligned to V elements (see the header: the caller's C % V and pointer checks).
template <int V, typename E>
__device__ __forceinline__ Pack<E, V> load(const E* p)
{
    return *reinterpret_cast<const Pack<E, V>*>(p);
}
template <int V, typename E>
__device__ __forceinline__ void store(E* p, const Pack<E, V>& v)
{
    *reinterpret_cast<Pack<E, V>*>(p) = v;
}

// Split the flat index i of a C-contiguous (N, A, B, C) array into (n, a, b, c).
// The kernels pass C/V for C, so c is the channel-vector index.
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

// Along one axis: the taps t in [lo, hi) of a window that starts at o0 (< size; < 0 in the
// padding), K taps D apart, whose positions o0 + t*D lie inside the input [0, size).
__device__ __forceinline__ void taps_inside(int o0, int K, int D, int size, int& lo, int& hi)
{
    if (D == 1) {  // no division for undilated windows, the usual case
        lo = max(0, -o0);
        hi = min(K, size - o0);
    } else {
        lo = o0 < 0 ? (-o0 + D - 1) / D : 0;
        hi = o0 < size ? min(K, (size - 1 - o0) / D + 1) : 0;
    }
}

// Along one axis: whether an offset `off` >= 0 from a window's start falls on one of its taps,
// D apart, and which tap t (the caller checks t < K).
__device__ __forceinline__ bool tap_at(int off, int D, int& t)
{
    if (D == 1) {
        t = off;
        return true;
    }
    t = off / D;
    return t * D == off;
}

// x (N, H, W, C) -> y (N, OH, OW, C), argmax (N, OH, OW, C); total = N * OH * OW * C / V
template <typename T, typename I, typename Idx, int V>
__global__ void max_pool2d_forward(const T* __restrict__ x, T* __restrict__ y,
                                   I* __restrict__ argmax, Idx total,
                                   int H, int W, int C, int OH, int OW,
                                   int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW)
{
    const T neg_inf = NegInf<T>::value();
    const Idx step = (Idx)gridDim.x * blockDim.x;
    const Idx tap_step = (Idx)DW * (Idx)C;  // elements from one tap of a row to the next
    for (Idx i = (Idx)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        Idx n;
        int oh, ow, cv;
        split_nabc(i, OH, OW, C / V, n, oh, ow, cv);
        const int c0 = cv * V;        // first channel of this thread's vector
        const int h0 = oh * SH - PH;  // window origin in input coordinates (may be < 0)
        const int w0 = ow * SW - PW;
        // Only the taps inside the input are visited: a tap outside reads -inf, which never
        // beats the running best (greater(-inf, b) is false for every b, NaN included, and
        // -inf is no NaN), so skipping it changes nothing -- and the loops need no bounds checks.
        int kh_lo, kh_hi, kw_lo, kw_hi;
        taps_inside(h0, KH, DH, H, kh_lo, kh_hi);
        taps_inside(w0, KW, DW, W, kw_lo, kw_hi);

        Pack<T, V> best;
        int best_k[V];
#pragma unroll
        for (int l = 0; l < V; ++l) {
            best.lane[l] = neg_inf;  // taps outside the input are -inf, so starting here with k = 0 ...
            best_k[l] = 0;           // ... gives numpy's answer when every value is -inf
        }
        for (int kh = kh_lo; kh < kh_hi; ++kh) {
            // The row's first tap inside the input; the index stays >= 0 (w0 alone may be < 0,
            // and an unsigned Idx would wrap instead of going negative).
            const T* p = x + ((n * H + (Idx)(h0 + kh * DH)) * W + (Idx)(w0 + kw_lo * DW)) * C + c0;
            for (int kw = kw_lo; kw < kw_hi; ++kw, p += tap_step) {
                const Pack<T, V> v = load<V>(p);
                const int k = kh * KW + kw;
#pragma unroll
                for (int l = 0; l < V; ++l) {
                    // Strictly greater keeps the first maximum; the first NaN beats any number
                    // and no later value (not even a NaN) replaces it.
                    const T a = v.lane[l], b = best.lane[l];
                    if (greater(a, b) || (a != a && b == b)) {
                        best.lane[l] = a;
                        best_k[l] = k;
                    }
                }
            }
        }
        Pack<I, V> best_index;
#pragma unroll
        for (int l = 0; l < V; ++l) best_index.lane[l] = (I)best_k[l];
        store<V>(y + i * V, best);  // output element offset of channel vector i is i * V
        store<V>(argmax + i * V, best_index);
    }
}

// dy (N, OH, OW, C), argmax (N, OH, OW, C) -> dx (N, H, W, C); total = N * H * W * C / V
template <typename T, typename I, typename Idx, int V>
__global__ void max_pool2d_backward(const T* __restrict__ dy, const I* __restrict__ argmax,
                                    T* __restrict__ dx, Idx total,
                                    int H, int W, int C, int OH, int OW,
                                    int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW)
{
    const Idx step = (Idx)gridDim.x * blockDim.x;
    for (Idx i = (Idx)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        Idx n;
        int ih, iw, cv;
        split_nabc(i, H, W, C / V, n, ih, iw, cv);
        const int c0 = cv * V;
        // In padded coordinates (>= 0), window o starts at o*S: the last window that starts at
        // or before this input is p / S. Walking back from it, the offset p - o*S grows by S a
        // window, and the windows whose span it outgrows (> D*(K-1)) end the walk.
        const int ph = ih + PH, pw = iw + PW;
        const int oh_last = min(ph / SH, OH - 1), ow_last = min(pw / SW, OW - 1);
        const int h_span = DH * (KH - 1), w_span = DW * (KW - 1);

        Pack<T, V> acc;
#pragma unroll
        for (int l = 0; l < V; ++l) acc.lane[l] = T(0);
        for (int oh = oh_last, h_off = ph - oh_last * SH; oh >= 0 && h_off <= h_span;
             --oh, h_off += SH) {
            int kh;
            if (!tap_at(h_off, DH, kh)) continue;  // the input falls between two dilated taps
            for (int ow = ow_last, w_off = pw - ow_last * SW; ow >= 0 && w_off <= w_span;
                 --ow, w_off += SW) {
                int kw;
                if (!tap_at(w_off, DW, kw)) continue;
                const Idx o = ((n * OH + (Idx)oh) * OW + (Idx)ow) * C + c0;
                const int k = kh * KW + kw;
                const Pack<I, V> am = load<V>(argmax + o);
                bool hit[V], any = false;
#pragma unroll
                for (int l = 0; l < V; ++l) {
                    hit[l] = (int)am.lane[l] == k;
                    any = any || hit[l];
                }
                if (any) {  // most windows route this input nothing: skip their dy
                    const Pack<T, V> g = load<V>(dy + o);
#pragma unroll
                    for (int l = 0; l < V; ++l) {
                        if (hit[l]) acc.lane[l] += g.lane[l];  // same order as V = 1: same bits
                    }
                }
            }
        }
        store<V>(dx + i * V, acc);
    }
}

// Windows that cannot overlap (SH > DH*(KH-1), SW > DW*(KW-1)): dy, argmax (N, OH, OW, C) ->
// dx (N, H, W, C), one thread per output vector writing its window's taps inside the input.
// total = N * OH * OW * C / V. Positions no tap reads are not written: the caller zero-fills dx
// when there are any.
template <typename T, typename I, typename Idx, int V>
__global__ void max_pool2d_backward_scatter(const T* __restrict__ dy, const I* __restrict__ argmax,
                                            T* __restrict__ dx, Idx total,
                                            int H, int W, int C, int OH, int OW,
                                            int KH, int KW, int SH, int SW, int PH, int PW,
                                            int DH, int DW)
{
    const Idx step = (Idx)gridDim.x * blockDim.x;
    const Idx tap_step = (Idx)DW * (Idx)C;
    for (Idx i = (Idx)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        Idx n;
        int oh, ow, cv;
        split_nabc(i, OH, OW, C / V, n, oh, ow, cv);
        const int c0 = cv * V;
        const int h0 = oh * SH - PH;
        const int w0 = ow * SW - PW;
        // The window's taps inside the input; the others have no dx to write.
        int kh_lo, kh_hi, kw_lo, kw_hi;
        taps_inside(h0, KH, DH, H, kh_lo, kh_hi);
        taps_inside(w0, KW, DW, W, kw_lo, kw_hi);
        const Pack<I, V> am = load<V>(argmax + i * V);
        const Pack<T, V> g = load<V>(dy + i * V);
        for (int kh = kh_lo; kh < kh_hi; ++kh) {
            T* p = dx + ((n * H + (Idx)(h0 + kh * DH)) * W + (Idx)(w0 + kw_lo * DW)) * C + c0;
            // Not unrolled: windows are narrow, and nvcc's unrolled remainder split the vector
            // store into V scalar stores.
#pragma unroll 1
            for (int kw = kw_lo; kw < kw_hi; ++kw, p += tap_step) {
                const int k = kh * KW + kw;
                Pack<T, V> out;
#pragma unroll
                for (int l = 0; l < V; ++l) out.lane[l] = ((int)am.lane[l] == k) ? g.lane[l] : T(0);
                store<V>(p, out);
            }
        }
    }
}
