// diffpure_fast: the op schemas and their CPU kernels (the extension-cpp pattern).
//
// sde_step_z       x_next = a*x + b*eps + c*z [+ guide]            (z given)
// sde_step_philox  x_next = a*x + b*eps + c*z(counter) [+ guide]   (z generated from diffpure_fast.noise's counter)
//
// guide: an optional additive term (guided purification), summed last; see step_value_g in sde_step.h.
//
// Registered here: the schemas (TORCH_LIBRARY) and the CPU kernels (TORCH_LIBRARY_IMPL). cuda/sde_step.cu adds the
// CUDA kernels against the same schemas. The fake (meta) and autograd formulas, and the Python kernels that stand
// in for missing C++ ones (the torch reference, Triton), are registered from Python in diffpure_fast/ops/_library.py,
// which also holds the same schema strings for a process without this extension (a test checks that they agree).
// Python calls torch.ops.diffpure_fast.<op>: the dispatcher picks the kernel, no Python wrapper in between.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>

#include "philox.h"
#include "sde_step.h"

extern "C" {
// An empty _C module: `import diffpure_fast._C` loads this .so, which runs the static TORCH_LIBRARY initialisers
// below. No pybind11, so the module needs no Python symbols beyond module creation.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      NULL,  // documentation
      -1,    // no per-interpreter state
      NULL,  // methods
  };
  return PyModule_Create(&module_def);
}
}

namespace diffpure_fast {
namespace {

// Elements per at::parallel_for task for the plain step: about 32K float32 elements (3 x 128 KiB read) amortise
// the task overhead, like at::internal::GRAIN_SIZE.
constexpr int64_t kStepGrain = 32768;
// Philox calls per task for the noisy step: each call costs 4 libm transcendental pairs (~100 ns), so far fewer
// of them than plain elements fill a task.
constexpr int64_t kQuadGrain = 1024;
// Philox calls processed together inside a task: the counter loop then the Box-Muller loop then the step loop,
// each over this many calls; 64 calls keep the 4 x 64 words and 256 doubles in L1.
constexpr int64_t kChunk = 64;

// guide: read only when kGuide (may be null otherwise).
template <bool kGuide, typename scalar_t, typename opmath_t>
void step_z_range(const scalar_t* __restrict__ x, const scalar_t* __restrict__ eps, const scalar_t* __restrict__ z,
                  const scalar_t* __restrict__ guide, scalar_t* __restrict__ out, int64_t n, opmath_t a, opmath_t b,
                  opmath_t c) {
  for (int64_t k = 0; k < n; ++k) {
    out[k] = step_value_g<kGuide, scalar_t, opmath_t>(x[k], eps[k], z[k], kGuide ? guide[k] : scalar_t(0), a, b, c);
  }
}

at::Tensor sde_step_z_cpu(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& z, double a, double b,
                          double c, const std::optional<at::Tensor>& guide) {
  check_x(x);
  check_like(x, eps, "eps");
  check_like(x, z, "z");
  const bool guided = check_guide(x, guide);
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());
  const at::Tensor xc = x.contiguous();
  const at::Tensor ec = eps.contiguous();
  const at::Tensor zc = z.contiguous();
  const at::Tensor gc = guided ? guide->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(xc, xc.options(), at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sde_step_z_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t a_ = static_cast<opmath_t>(a), b_ = static_cast<opmath_t>(b), c_ = static_cast<opmath_t>(c);
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* ep = ec.const_data_ptr<scalar_t>();
    const scalar_t* zp = zc.const_data_ptr<scalar_t>();
    const scalar_t* gp = guided ? gc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, xc.numel(), kStepGrain, [&](int64_t begin, int64_t end) {
      if (guided) {
        step_z_range<true, scalar_t, opmath_t>(xp + begin, ep + begin, zp + begin, gp + begin, op + begin,
                                               end - begin, a_, b_, c_);
      } else {
        step_z_range<false, scalar_t, opmath_t>(xp + begin, ep + begin, zp + begin, nullptr, op + begin,
                                                end - begin, a_, b_, c_);
      }
    });
  });
  return out;
}

// One sample's Philox calls [q_begin, q_end): elements 4*q_begin .. min(4*q_end, n) of that sample.
// guide: read only when kGuide (may be null otherwise).
template <bool kGuide, typename scalar_t, typename opmath_t>
void step_philox_range(const scalar_t* __restrict__ x, const scalar_t* __restrict__ eps,
                       const scalar_t* __restrict__ guide, scalar_t* __restrict__ out, int64_t n, int64_t q_begin,
                       int64_t q_end, opmath_t a, opmath_t b, opmath_t c, uint64_t seed, uint32_t sample_id,
                       uint32_t step, uint32_t stream) {
  uint32_t w0[kChunk], w1[kChunk], w2[kChunk], w3[kChunk];
  double zd[4 * kChunk];
  for (int64_t q0 = q_begin; q0 < q_end; q0 += kChunk) {
    const int64_t len = std::min(kChunk, q_end - q0);
    // Integer-only and branch-free: the compiler vectorises the 32x32->64 multiplies across calls.
    for (int64_t j = 0; j < len; ++j) {
      const PhiloxWords p = philox_quad(seed, static_cast<uint64_t>(q0 + j), sample_id, step, stream);
      w0[j] = p.w[0];
      w1[j] = p.w[1];
      w2[j] = p.w[2];
      w3[j] = p.w[3];
    }
    // Scalar libm calls: they are what keeps the noise bit-equal to the reference (vector libm is not).
    for (int64_t j = 0; j < len; ++j) {
      box_muller(w0[j], w1[j], &zd[4 * j], &zd[4 * j + 1]);
      box_muller(w2[j], w3[j], &zd[4 * j + 2], &zd[4 * j + 3]);
    }
    const int64_t e0 = 4 * q0;
    const int64_t count = std::min(4 * len, n - e0);
    for (int64_t k = 0; k < count; ++k) {
      out[e0 + k] = step_value_g<kGuide, scalar_t, opmath_t>(x[e0 + k], eps[e0 + k], static_cast<scalar_t>(zd[k]),
                                                            kGuide ? guide[e0 + k] : scalar_t(0), a, b, c);
    }
  }
}

at::Tensor sde_step_philox_cpu(const at::Tensor& x, const at::Tensor& eps, double a, double b, double c,
                               int64_t seed, const at::Tensor& sample_ids, int64_t step, int64_t stream,
                               const std::optional<at::Tensor>& guide) {
  check_x(x);
  check_like(x, eps, "eps");
  const bool guided = check_guide(x, guide);
  const int64_t n = check_philox_args(x, seed, sample_ids);
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());
  const at::Tensor xc = x.contiguous();
  const at::Tensor ec = eps.contiguous();
  const at::Tensor gc = guided ? guide->contiguous() : at::Tensor();
  const at::Tensor ids = sample_ids.contiguous();
  at::Tensor out = at::empty_like(xc, xc.options(), at::MemoryFormat::Contiguous);
  const int64_t batch = x.size(0);
  const int64_t* idp = ids.const_data_ptr<int64_t>();
  if (batch > 0) {
    const auto [lo, hi] = std::minmax_element(idp, idp + batch);
    check_sample_id_range(*lo, *hi);
  }
  const int64_t n_quads = (n + 3) / 4;
  if (batch == 0 || n == 0) {
    return out;
  }
  // step and stream enter the counter modulo 2^32, as in noise.gaussian.
  const uint32_t step32 = static_cast<uint32_t>(step), stream32 = static_cast<uint32_t>(stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sde_step_philox_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t a_ = static_cast<opmath_t>(a), b_ = static_cast<opmath_t>(b), c_ = static_cast<opmath_t>(c);
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* ep = ec.const_data_ptr<scalar_t>();
    const scalar_t* gp = guided ? gc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    // Parallel over all (sample, call) pairs so that a small batch of large samples still spreads over threads.
    at::parallel_for(0, batch * n_quads, kQuadGrain, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end;) {
        const int64_t i = g / n_quads;
        const int64_t q = g - i * n_quads;
        const int64_t q_end = std::min(n_quads, q + (end - g));
        const int64_t off = i * n;
        const uint64_t seed64 = static_cast<uint64_t>(seed);
        const uint32_t id32 = static_cast<uint32_t>(idp[i]);
        if (guided) {
          step_philox_range<true, scalar_t, opmath_t>(xp + off, ep + off, gp + off, op + off, n, q, q_end, a_, b_,
                                                      c_, seed64, id32, step32, stream32);
        } else {
          step_philox_range<false, scalar_t, opmath_t>(xp + off, ep + off, nullptr, op + off, n, q, q_end, a_, b_,
                                                       c_, seed64, id32, step32, stream32);
        }
        g += q_end - q;
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(diffpure_fast, m) {
  // The fake kernels are registered from this Python module: torch imports it when a fake tensor meets the op
  // before the package was imported (and checks that register_fake is called from there).
  m.set_python_module("diffpure_fast.ops._library");
  m.def("sde_step_z(Tensor x, Tensor eps, Tensor z, float a, float b, float c, Tensor? guide=None) -> Tensor");
  m.def(
      "sde_step_philox(Tensor x, Tensor eps, float a, float b, float c, int seed, Tensor sample_ids, int step, "
      "int stream, Tensor? guide=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(diffpure_fast, CPU, m) {
  m.impl("sde_step_z", &sde_step_z_cpu);
  m.impl("sde_step_philox", &sde_step_philox_cpu);
}

}  // namespace diffpure_fast
