// Input checks and the per-element arithmetic shared by the CPU (diffpure_fast.cpp) and CUDA (cuda/sde_step.cu)
// kernels of diffpure_fast::sde_step_z and diffpure_fast::sde_step_philox.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <optional>
#include <sstream>
#include <string>

#include "philox.h"

namespace diffpure_fast {

// Elements per sample: Philox's first counter word holds e >> 2, so e < 2^34 (noise.MAX_ELEMENTS_PER_SAMPLE).
constexpr int64_t kMaxElementsPerSample = int64_t{1} << 34;
// The largest sample id: the ids fill a 32-bit word of the noise counter.
constexpr int64_t kMaxSampleId = int64_t{0xFFFFFFFF};

// x_next = (a*x + b*eps) + c*z with a, b, c rounded to opmath_t (the tensor dtype, float for half/bfloat16) and
// every product and sum rounded to scalar_t, in the order torch evaluates `x * a + eps * b + z * c`. Bit-exact
// against that expression only without fused multiply-adds: build with -ffp-contract=off (host) and
// --fmad=false (nvcc).
template <typename scalar_t, typename opmath_t>
DIFFPURE_HD scalar_t step_value(scalar_t x, scalar_t eps, scalar_t z, opmath_t a, opmath_t b, opmath_t c) {
  const scalar_t ax = static_cast<scalar_t>(a * static_cast<opmath_t>(x));
  const scalar_t be = static_cast<scalar_t>(b * static_cast<opmath_t>(eps));
  const scalar_t s = static_cast<scalar_t>(static_cast<opmath_t>(ax) + static_cast<opmath_t>(be));
  const scalar_t cz = static_cast<scalar_t>(c * static_cast<opmath_t>(z));
  return static_cast<scalar_t>(static_cast<opmath_t>(s) + static_cast<opmath_t>(cz));
}

// The guided step: x_next = ((a*x + b*eps) + c*z) + guide, i.e. step_value's result (rounded to scalar_t) plus the
// guidance term, that last sum rounded to scalar_t too -- the order torch evaluates `x * a + eps * b + z * c +
// guide`. Without a guide the kernels call step_value alone (results bit-identical to the unguided op).
template <typename scalar_t, typename opmath_t>
DIFFPURE_HD scalar_t guided_value(scalar_t step, scalar_t guide) {
  return static_cast<scalar_t>(static_cast<opmath_t>(step) + static_cast<opmath_t>(guide));
}

// step_value, plus the guide when kGuide (the guide argument is ignored otherwise): one instantiation per case so
// that the unguided loops stay exactly as they were.
template <bool kGuide, typename scalar_t, typename opmath_t>
DIFFPURE_HD scalar_t step_value_g(scalar_t x, scalar_t eps, scalar_t z, scalar_t guide, opmath_t a, opmath_t b,
                                  opmath_t c) {
  const scalar_t v = step_value<scalar_t, opmath_t>(x, eps, z, a, b, c);
  if constexpr (kGuide) {
    return guided_value<scalar_t, opmath_t>(v, guide);
  } else {
    return v;
  }
}

// The Python spelling of a tensor's shape, dtype and device -- "(2, 3, 4, 4), torch.float32, cpu" -- so that an
// error reads the same whichever implementation raised it (the Python kernels' checks in diffpure_fast/ops/_library.py
// print these with tuple(t.shape), t.dtype, t.device).
inline std::string py_shape(at::IntArrayRef sizes) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    s << (i ? ", " : "") << sizes[i];
  }
  s << (sizes.size() == 1 ? ",)" : ")");
  return s.str();
}

inline std::string py_dtype(at::ScalarType dtype) {
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

inline std::string py_describe(const at::Tensor& t) {
  return py_shape(t.sizes()) + ", " + py_dtype(t.scalar_type()) + ", " + t.device().str();
}

// The checks raise ValueError (TORCH_CHECK_VALUE) with the messages of the Python kernels' checks, in the same order:
// one error, naming the argument, for every implementation.
inline void check_like(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.device() == x.device(),
                    "sde_step: ", name, " must have the shape, dtype and device of x ", py_describe(x), "; got ",
                    py_describe(t));
}

// An optional guide, when given, must be like x; returns whether it was given.
inline bool check_guide(const at::Tensor& x, const std::optional<at::Tensor>& guide) {
  if (!guide.has_value()) {
    return false;
  }
  check_like(x, *guide, "guide");
  return true;
}

inline void check_x(const at::Tensor& x) {
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "sde_step: x must be a floating tensor, got ",
                    py_dtype(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() >= 1, "sde_step: x must be (B, ...), got a 0-dim tensor");
}

// Checks the philox-only arguments but the ids' values (check_sample_id_range); returns the elements per sample.
inline int64_t check_philox_args(const at::Tensor& x, int64_t seed, const at::Tensor& sample_ids) {
  TORCH_CHECK_VALUE(seed >= 0, "sde_step: seed must be in [0, 2^63), got ", seed);
  TORCH_CHECK_VALUE(sample_ids.dim() == 1 && sample_ids.size(0) == x.size(0) &&
                        sample_ids.scalar_type() == at::kLong && sample_ids.device() == x.device(),
                    "sde_step: sample_ids must be (", x.size(0), ",) int64 on x's device ", x.device().str(),
                    "; got ", py_shape(sample_ids.sizes()), " ", py_dtype(sample_ids.scalar_type()), " on ",
                    sample_ids.device().str());
  const int64_t per_sample = x.size(0) ? x.numel() / x.size(0) : 0;
  TORCH_CHECK_VALUE(per_sample <= kMaxElementsPerSample, "sde_step: at most 2^34 elements per sample, got ",
                    per_sample);
  return per_sample;
}

// The ids fill a 32-bit word of the noise counter: a larger or negative id would wrap onto another id's noise, so
// the CPU kernel rejects it (the CUDA kernels, which cannot raise without a synchronisation, write NaN for that
// sample instead). lo, hi: the smallest and largest id.
inline void check_sample_id_range(int64_t lo, int64_t hi) {
  TORCH_CHECK_VALUE(lo >= 0 && hi <= kMaxSampleId,
                    "sde_step: sample_ids must be in [0, 2^32) (they fill a 32-bit word of the noise counter); "
                    "got values in [", lo, ", ", hi, "]");
}

}  // namespace diffpure_fast
