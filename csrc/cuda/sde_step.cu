// CUDA kernels of diffpure_fast::sde_step_z and diffpure_fast::sde_step_philox (schemas in diffpure_fast.cpp).
//
// Both are streaming elementwise kernels: 3 (z given: 4; a guide adds one) tensors touched once, so the target is
// DRAM bandwidth. kGuide instantiates the guided step (+ guide, summed last, see sde_step.h); without it the guide
// pointer is never read and the kernel is the unguided one.
// Each thread owns 4 consecutive elements -- for the philox step exactly the 4 lanes of one Philox call -- and moves
// them with one 16-byte load/store per tensor for float32 (two for float64) when the data is 16-byte aligned.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

#include "philox.h"
#include "sde_step.h"

namespace diffpure_fast {
namespace {

// 256 threads = 8 warps: enough independent warps per block to hide load latency.
constexpr int kThreads = 256;

// Four elements moved as one aligned vector (16 bytes for float32, 32 for float64, 8 for half/bfloat16).
template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename T>
bool is_vec4_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Vec4<T>) == 0;
}

// Blocks of `kernel` that can be resident at once on the current device: SMs x blocks per SM, from the occupancy
// API rather than from thread slots. ptxas -v (printed by scripts/check_cuda_compile.sh) gives the philox kernels
// 36-44 registers per thread and a 40-byte stack frame, the z-given ones 18-34: with registers allocated per warp in
// units of 256, 5-6 blocks of 256 threads of a philox kernel fit on an sm_80/sm_90 SM (65536 registers), not the 8
// its 2048 thread slots alone would allow; a grid sized for 8 runs 1.3-1.6 waves, the last one partly idle. The two
// driver queries are cached per (device, kernel instantiation): a mutex and a map lookup cost ~0.1 us against a
// ~3 us launch.
int64_t resident_blocks(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, int64_t> cache;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(device, kernel);
  const auto it = cache.find(key);
  if (it != cache.end()) {
    return it->second;
  }
  int sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  const int64_t blocks = int64_t{sms} * std::max(1, per_sm);
  cache.emplace(key, blocks);
  return blocks;
}

// Grid-stride launch: one resident wave loops over the work instead of launching one block per 1024 elements; this
// caps the block count for 10^8-element tensors and keeps every SM streaming to the end. Launches on the current
// device and stream (the callers hold a CUDAGuard for x's device).
template <typename... KernelArgs, typename... Args>
void launch_grid_stride(void (*kernel)(KernelArgs...), int64_t work_items, cudaStream_t stream, Args... args) {
  const int64_t resident = resident_blocks(reinterpret_cast<const void*>(kernel));
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((work_items + kThreads - 1) / kThreads, resident));
  kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(args...);
}

template <typename scalar_t, typename opmath_t, bool kVec, bool kGuide>
__global__ void __launch_bounds__(kThreads)
    sde_step_z_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ eps,
                      const scalar_t* __restrict__ z, const scalar_t* __restrict__ guide, scalar_t* __restrict__ out,
                      int64_t n, opmath_t a, opmath_t b, opmath_t c) {
  const int64_t n_vec = (n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < n_vec; v += stride) {
    const int64_t e = 4 * v;
    if (kVec && e + 4 <= n) {
      const Vec4<scalar_t> xv = reinterpret_cast<const Vec4<scalar_t>*>(x)[v];
      const Vec4<scalar_t> ev = reinterpret_cast<const Vec4<scalar_t>*>(eps)[v];
      const Vec4<scalar_t> zv = reinterpret_cast<const Vec4<scalar_t>*>(z)[v];
      Vec4<scalar_t> gv{};
      if constexpr (kGuide) {
        gv = reinterpret_cast<const Vec4<scalar_t>*>(guide)[v];
      }
      Vec4<scalar_t> ov;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        ov.v[k] = step_value_g<kGuide, scalar_t, opmath_t>(xv.v[k], ev.v[k], zv.v[k], gv.v[k], a, b, c);
      }
      reinterpret_cast<Vec4<scalar_t>*>(out)[v] = ov;
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (e + k < n) {
          out[e + k] = step_value_g<kGuide, scalar_t, opmath_t>(x[e + k], eps[e + k], z[e + k],
                                                               kGuide ? guide[e + k] : scalar_t(0), a, b, c);
        }
      }
    }
  }
}

// One thread per (sample, Philox call): it generates the 4 noise values of elements 4q .. 4q + 3 of its sample in
// float64 (the Box-Muller of philox.h, with libdevice log/sqrt/sincos) and applies the step to those 4 elements.
// kVec: every sample starts 4-element aligned (n % 4 == 0) and the pointers are Vec4-aligned.
template <typename scalar_t, typename opmath_t, bool kVec, bool kGuide>
__global__ void __launch_bounds__(kThreads)
    sde_step_philox_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ eps,
                           const scalar_t* __restrict__ guide, scalar_t* __restrict__ out,
                           const int64_t* __restrict__ sample_ids, int64_t n, int64_t n_quads, int64_t total_quads,
                           opmath_t a, opmath_t b, opmath_t c, uint64_t seed, uint32_t step, uint32_t stream) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < total_quads; g += stride) {
    // A 64-bit division per call: cheap next to the float64 transcendental functions that follow.
    const int64_t i = g / n_quads;
    const int64_t q = g - i * n_quads;
    const int64_t id = __ldg(sample_ids + i);
    double zd[4];
    gaussian_quad(seed, static_cast<uint64_t>(q), static_cast<uint32_t>(id), step, stream, zd);
    if (id < 0 || id > kMaxSampleId) {
      // An id outside [0, 2^32) would wrap onto another sample's noise: its sample's output is NaN instead (the
      // range is not checked on the host, which would cost a synchronisation per step; see sde_step_philox_cuda).
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        zd[k] = __longlong_as_double(0x7ff8000000000000LL);
      }
    }
    const int64_t e = 4 * q;
    const int64_t base = i * n + e;
    if (kVec) {
      const int64_t v = base / 4;
      const Vec4<scalar_t> xv = reinterpret_cast<const Vec4<scalar_t>*>(x)[v];
      const Vec4<scalar_t> ev = reinterpret_cast<const Vec4<scalar_t>*>(eps)[v];
      Vec4<scalar_t> gv{};
      if constexpr (kGuide) {
        gv = reinterpret_cast<const Vec4<scalar_t>*>(guide)[v];
      }
      Vec4<scalar_t> ov;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        ov.v[k] =
            step_value_g<kGuide, scalar_t, opmath_t>(xv.v[k], ev.v[k], static_cast<scalar_t>(zd[k]), gv.v[k], a, b, c);
      }
      reinterpret_cast<Vec4<scalar_t>*>(out)[v] = ov;
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (e + k < n) {
          out[base + k] = step_value_g<kGuide, scalar_t, opmath_t>(x[base + k], eps[base + k],
                                                                  static_cast<scalar_t>(zd[k]),
                                                                  kGuide ? guide[base + k] : scalar_t(0), a, b, c);
        }
      }
    }
  }
}

// Launches kernel<..., kVec, kGuide> for the runtime (vec, guided) pair: four instantiations per dtype.
#define DIFFPURE_LAUNCH_VEC_GUIDE(vec, guided, work, KERNEL, ...)                                           \
  do {                                                                                                      \
    if (vec && guided) {                                                                                    \
      launch_grid_stride(KERNEL<scalar_t, opmath_t, true, true>, work, cuda_stream, __VA_ARGS__);   \
    } else if (vec) {                                                                                       \
      launch_grid_stride(KERNEL<scalar_t, opmath_t, true, false>, work, cuda_stream, __VA_ARGS__);  \
    } else if (guided) {                                                                                    \
      launch_grid_stride(KERNEL<scalar_t, opmath_t, false, true>, work, cuda_stream, __VA_ARGS__);  \
    } else {                                                                                                \
      launch_grid_stride(KERNEL<scalar_t, opmath_t, false, false>, work, cuda_stream, __VA_ARGS__); \
    }                                                                                                       \
  } while (0)

at::Tensor sde_step_z_cuda(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& z, double a, double b,
                           double c, const std::optional<at::Tensor>& guide) {
  check_x(x);
  check_like(x, eps, "eps");
  check_like(x, z, "z");
  const bool guided = check_guide(x, guide);
  TORCH_INTERNAL_ASSERT(x.device().is_cuda());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor ec = eps.contiguous();
  const at::Tensor zc = z.contiguous();
  const at::Tensor gc = guided ? guide->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(xc, xc.options(), at::MemoryFormat::Contiguous);
  const int64_t n = xc.numel();
  if (n == 0) {
    return out;
  }
  const cudaStream_t cuda_stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sde_step_z_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t a_ = static_cast<opmath_t>(a), b_ = static_cast<opmath_t>(b), c_ = static_cast<opmath_t>(c);
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* ep = ec.const_data_ptr<scalar_t>();
    const scalar_t* zp = zc.const_data_ptr<scalar_t>();
    const scalar_t* gp = guided ? gc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const bool vec = is_vec4_aligned<scalar_t>(xp) && is_vec4_aligned<scalar_t>(ep) &&
                     is_vec4_aligned<scalar_t>(zp) && is_vec4_aligned<scalar_t>(op) &&
                     (!guided || is_vec4_aligned<scalar_t>(gp));
    DIFFPURE_LAUNCH_VEC_GUIDE(vec, guided, (n + 3) / 4, sde_step_z_kernel, xp, ep, zp, gp, op, n, a_, b_, c_);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor sde_step_philox_cuda(const at::Tensor& x, const at::Tensor& eps, double a, double b, double c,
                                int64_t seed, const at::Tensor& sample_ids, int64_t step, int64_t stream,
                                const std::optional<at::Tensor>& guide) {
  check_x(x);
  check_like(x, eps, "eps");
  const bool guided = check_guide(x, guide);
  const int64_t n = check_philox_args(x, seed, sample_ids);
  TORCH_INTERNAL_ASSERT(x.device().is_cuda());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t batch = x.size(0);
  // The ids' values are not checked here: on the host that is a reduction and a device-to-host copy, i.e. a
  // synchronisation per step (15-40 us in which the host queues nothing, and an error under
  // torch.cuda.set_sync_debug_mode("error")). The engine checks them once per purification; a direct call with an
  // id outside [0, 2^32) gets NaN in that sample's output from the kernel (never another sample's noise).
  const at::Tensor xc = x.contiguous();
  const at::Tensor ec = eps.contiguous();
  const at::Tensor ids = sample_ids.contiguous();
  const at::Tensor gc = guided ? guide->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(xc, xc.options(), at::MemoryFormat::Contiguous);
  if (batch == 0 || n == 0) {
    return out;
  }
  const int64_t n_quads = (n + 3) / 4;
  const int64_t total_quads = batch * n_quads;
  const cudaStream_t cuda_stream = c10::cuda::getCurrentCUDAStream();
  const uint64_t seed64 = static_cast<uint64_t>(seed);
  const uint32_t step32 = static_cast<uint32_t>(step), stream32 = static_cast<uint32_t>(stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sde_step_philox_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t a_ = static_cast<opmath_t>(a), b_ = static_cast<opmath_t>(b), c_ = static_cast<opmath_t>(c);
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* ep = ec.const_data_ptr<scalar_t>();
    const scalar_t* gp = guided ? gc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t* idp = ids.const_data_ptr<int64_t>();
    const bool vec = n % 4 == 0 && is_vec4_aligned<scalar_t>(xp) && is_vec4_aligned<scalar_t>(ep) &&
                     is_vec4_aligned<scalar_t>(op) && (!guided || is_vec4_aligned<scalar_t>(gp));
    DIFFPURE_LAUNCH_VEC_GUIDE(vec, guided, total_quads, sde_step_philox_kernel, xp, ep, gp, op, idp, n, n_quads,
                              total_quads, a_, b_, c_, seed64, step32, stream32);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

#undef DIFFPURE_LAUNCH_VEC_GUIDE

}  // namespace

TORCH_LIBRARY_IMPL(diffpure_fast, CUDA, m) {
  m.impl("sde_step_z", &sde_step_z_cuda);
  m.impl("sde_step_philox", &sde_step_philox_cuda);
}

}  // namespace diffpure_fast
