// Parallel element-wise math for BVLC Caffe 1.0 on the CPU, loaded with LD_PRELOAD.
//
// Debian's libcaffe runs its element-wise vector functions (caffe_mul, caffe_div, caffe_powx, ...) on one
// thread. The solver update is made of them: Adam over the TS-FCN's 68 M parameters is seven passes over
// arrays of 272 MB each, and on a 2-core machine it took 40-50 % of a training iteration while the second
// core waited. libcaffe calls these functions through its PLT, so a library preloaded into the process
// replaces them without rebuilding Caffe: this file defines the float versions again, with the same
// signatures (the mangled names must match libcaffe's), splitting each array into one contiguous chunk per
// thread (OpenMP). Each chunk runs exactly the operation Caffe's own code runs (the same IEEE operation
// per element, or the same OpenBLAS call on a sub-range), so the results are bit-identical to Debian's
// binary; tools/runtime/parallel_math.py checks that before it is used (make env) and tests/
// test_parallel_math.py checks it on a training run.
//
// Small arrays (below kParallelMin elements) stay on the calling thread. Double-precision versions are
// left to libcaffe (the toolkit trains in float).
#include <cmath>
#include <omp.h>

// The three CBLAS functions Caffe calls here (OpenBLAS provides them through libblas.so.3).
extern "C" {
void cblas_saxpby(const int n, const float alpha, const float* x, const int incx, const float beta, float* y,
                  const int incy);
void cblas_scopy(const int n, const float* x, const int incx, float* y, const int incy);
void cblas_sscal(const int n, const float alpha, float* x, const int incx);
}

namespace {
const int kParallelMin = 1 << 16;

// Calls fn(begin, end) on one contiguous chunk per thread (or once, on this thread, for small n).
template <typename Fn>
inline void chunked(const int n, Fn fn) {
  if (n < kParallelMin || omp_get_max_threads() < 2) {
    fn(0, n);
    return;
  }
#pragma omp parallel
  {
    const int threads = omp_get_num_threads(), t = omp_get_thread_num();
    // Chunks start on 16-float (64-byte) boundaries so that each thread streams whole cache lines.
    const long step = ((static_cast<long>(n) + threads - 1) / threads + 15) / 16 * 16;
    const long begin = t * step, end = begin + step < n ? begin + step : n;
    if (begin < end) fn(static_cast<int>(begin), static_cast<int>(end));
  }
}
}  // namespace

namespace caffe {

template <typename Dtype> void caffe_mul(const int n, const Dtype* a, const Dtype* b, Dtype* y);
template <typename Dtype> void caffe_div(const int n, const Dtype* a, const Dtype* b, Dtype* y);
template <typename Dtype> void caffe_powx(const int n, const Dtype* a, const Dtype b, Dtype* y);
template <typename Dtype> void caffe_add_scalar(const int n, const Dtype alpha, Dtype* y);
template <typename Dtype>
void caffe_cpu_axpby(const int n, const Dtype alpha, const Dtype* x, const Dtype beta, Dtype* y);
template <typename Dtype> void caffe_cpu_scale(const int n, const Dtype alpha, const Dtype* x, Dtype* y);

// caffe/util/mkl_alternate.hpp: vsMul, vsDiv, vsPowx are these loops; caffe_add_scalar is this loop.
template <>
void caffe_mul<float>(const int n, const float* a, const float* b, float* y) {
  chunked(n, [=](int i0, int i1) { for (int i = i0; i < i1; ++i) y[i] = a[i] * b[i]; });
}

template <>
void caffe_div<float>(const int n, const float* a, const float* b, float* y) {
  chunked(n, [=](int i0, int i1) { for (int i = i0; i < i1; ++i) y[i] = a[i] / b[i]; });
}

// Adam's only call is powx(v, 0.5): glibc's powf there takes 0.65 s per TS-FCN update, five times a square
// root. sqrtf is correctly rounded; powf(x, 0.5) is off by one ulp for about 0.1 % of inputs, so this is the
// one function whose results differ from Debian's binary (within the self-check's 1e-4 on the loss curve).
template <>
void caffe_powx<float>(const int n, const float* a, const float b, float* y) {
  if (b == 0.5f) {
    chunked(n, [=](int i0, int i1) { for (int i = i0; i < i1; ++i) y[i] = std::sqrt(a[i]); });
  } else {
    chunked(n, [=](int i0, int i1) { for (int i = i0; i < i1; ++i) y[i] = std::pow(a[i], b); });
  }
}

template <>
void caffe_add_scalar<float>(const int n, const float alpha, float* y) {
  chunked(n, [=](int i0, int i1) { for (int i = i0; i < i1; ++i) y[i] += alpha; });
}

// caffe/util/math_functions.cpp: cblas_saxpby (OpenBLAS's own), and scale = copy + scal.
template <>
void caffe_cpu_axpby<float>(const int n, const float alpha, const float* x, const float beta, float* y) {
  chunked(n, [=](int i0, int i1) { cblas_saxpby(i1 - i0, alpha, x + i0, 1, beta, y + i0, 1); });
}

template <>
void caffe_cpu_scale<float>(const int n, const float alpha, const float* x, float* y) {
  chunked(n, [=](int i0, int i1) {
    cblas_scopy(i1 - i0, x + i0, 1, y + i0, 1);
    cblas_sscal(i1 - i0, alpha, y + i0, 1);
  });
}

}  // namespace caffe
