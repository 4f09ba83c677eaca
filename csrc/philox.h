// Counter-based noise of diffpure_fast.noise: Philox4x32-10 and a float64 Box-Muller transform.
//
// Header-only and free of torch, so that the C++ kernel, the CUDA kernel and tests/cpp/test_philox.cpp share it.
// Under nvcc every function is __host__ __device__; on the host the transcendental functions are libm's, which is
// what makes the C++ kernel's float32 noise bit-equal to the torch reference (see noise.py for the specification).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DIFFPURE_HD __host__ __device__ __forceinline__
#else
#define DIFFPURE_HD inline
#endif

namespace diffpure_fast {

// The Random123 constants (Salmon et al., SC'11).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

struct PhiloxWords {
  uint32_t w[4];
};

DIFFPURE_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// Philox4x32-10 of the counter (c0, c1, c2, c3) under the key (k0, k1).
DIFFPURE_HD PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    if (r) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kPhiloxM0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(kPhiloxM1, c2, &hi1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

// The Philox call that holds element e (flat index inside one sample) of sample `sample_id` at (step, stream):
// counter (e >> 2, sample_id, step, stream), key (seed mod 2^32, seed >> 32). Its four words serve elements
// 4q .. 4q + 3 with q = e >> 2.
DIFFPURE_HD PhiloxWords philox_quad(uint64_t seed, uint64_t quad, uint32_t sample_id, uint32_t step, uint32_t stream) {
  return philox4x32_10(static_cast<uint32_t>(quad), sample_id, step, stream, static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

// Box-Muller in float64 on one word pair: u = (w_even + 1) / 2^32 in (0, 1], v = w_odd / 2^32 in [0, 1),
// r = sqrt(-2 ln u); *z0 = r cos(2 pi v), *z1 = r sin(2 pi v). Each operation is rounded in the same order as
// noise.gaussian so that only the libm / libdevice functions can differ from the reference.
DIFFPURE_HD void box_muller(uint32_t w_even, uint32_t w_odd, double* z0, double* z1) {
  constexpr double kInv2Pow32 = 1.0 / 4294967296.0;
  constexpr double kTwoPi = 6.283185307179586;  // float64(2 * pi), as Python's 2.0 * math.pi
  const double u = (static_cast<double>(w_even) + 1.0) * kInv2Pow32;
  const double v = static_cast<double>(w_odd) * kInv2Pow32;
  const double theta = kTwoPi * v;
#if defined(__CUDA_ARCH__)
  const double r = sqrt(-2.0 * log(u));
  double s, c;
  sincos(theta, &s, &c);
  *z0 = r * c;
  *z1 = r * s;
#else
  const double r = std::sqrt(-2.0 * std::log(u));
  *z0 = r * std::cos(theta);
  *z1 = r * std::sin(theta);
#endif
}

// The four standard normal values of one Philox call, in element order 4q + 0 .. 4q + 3.
DIFFPURE_HD void gaussian_quad(uint64_t seed, uint64_t quad, uint32_t sample_id, uint32_t step, uint32_t stream,
                               double out[4]) {
  const PhiloxWords p = philox_quad(seed, quad, sample_id, step, stream);
  box_muller(p.w[0], p.w[1], &out[0], &out[1]);
  box_muller(p.w[2], p.w[3], &out[2], &out[3]);
}

}  // namespace diffpure_fast
