// Unit test of csrc/philox.h without torch: Random123 known-answer vectors for Philox4x32-10, and Box-Muller
// sanity (moments, range, lane order).
#include <cmath>
#include <cstdint>
#include <cstdio>

#include "philox.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL: %s\n", what);
    ++failures;
  }
}

void known_answer(const uint32_t ctr[4], const uint32_t key[2], const uint32_t want[4], const char* name) {
  const diffpure_fast::PhiloxWords got =
      diffpure_fast::philox4x32_10(ctr[0], ctr[1], ctr[2], ctr[3], key[0], key[1]);
  bool ok = true;
  for (int i = 0; i < 4; ++i) ok = ok && got.w[i] == want[i];
  if (!ok) {
    std::printf("  %s: got %08x %08x %08x %08x, want %08x %08x %08x %08x\n", name, got.w[0], got.w[1], got.w[2],
                got.w[3], want[0], want[1], want[2], want[3]);
  }
  expect(ok, name);
}

void test_known_answers() {
  // Random123 kat_vectors, philox4x32 with 10 rounds.
  const uint32_t c0[4] = {0, 0, 0, 0}, k0[2] = {0, 0};
  const uint32_t w0[4] = {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u};
  known_answer(c0, k0, w0, "philox4x32-10 zero counter, zero key");

  const uint32_t c1[4] = {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, k1[2] = {0xffffffffu, 0xffffffffu};
  const uint32_t w1[4] = {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu};
  known_answer(c1, k1, w1, "philox4x32-10 all-ones counter and key");

  const uint32_t c2[4] = {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, k2[2] = {0xa4093822u, 0x299f31d0u};
  const uint32_t w2[4] = {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u};
  known_answer(c2, k2, w2, "philox4x32-10 pi-digits counter and key");
}

void test_counter_layout() {
  // philox_quad packs (quad, sample, step, stream) and the 64-bit seed exactly like noise.gaussian.
  const uint64_t seed = (uint64_t{0x299f31d0u} << 32) | 0xa4093822u;
  const diffpure_fast::PhiloxWords a = diffpure_fast::philox_quad(seed, 0x243f6a88u, 0x85a308d3u, 0x13198a2eu,
                                                                  0x03707344u);
  expect(a.w[0] == 0xd16cfe09u && a.w[3] == 0x24126ea1u, "philox_quad counter/key layout");
}

void test_box_muller() {
  double z0, z1;
  // u = 1 (the largest even word) gives r = 0 exactly; v = 0 puts the value on lane 0.
  diffpure_fast::box_muller(0xffffffffu, 0u, &z0, &z1);
  expect(z0 == 0.0 && z1 == 0.0, "box_muller: u = 1 gives 0");
  // u = 2^-32 (the smallest) gives the largest radius, sqrt(64 ln 2) = 6.66...; v = 0 gives (r, 0).
  diffpure_fast::box_muller(0u, 0u, &z0, &z1);
  expect(std::fabs(z0 - std::sqrt(64.0 * std::log(2.0))) < 1e-12 && z1 == 0.0, "box_muller: extreme radius");
  // v = 1/4 rotates to the sine lane.
  diffpure_fast::box_muller(0u, 0x40000000u, &z0, &z1);
  expect(std::fabs(z0) < 1e-12 && std::fabs(z1 - std::sqrt(64.0 * std::log(2.0))) < 1e-12,
         "box_muller: quarter turn");

  // Moments of 2^20 values: mean 0, variance 1, kurtosis 3, within 5 standard errors.
  const int n_quads = 1 << 18;
  double s1 = 0, s2 = 0, s4 = 0, zmax = 0;
  for (int q = 0; q < n_quads; ++q) {
    double z[4];
    diffpure_fast::gaussian_quad(20240601u, static_cast<uint64_t>(q), 7u, 3u, 1u, z);
    for (double v : z) {
      s1 += v;
      s2 += v * v;
      s4 += v * v * v * v;
      zmax = std::fmax(zmax, std::fabs(v));
    }
  }
  const double n = 4.0 * n_quads;
  const double mean = s1 / n, var = s2 / n, kurt = s4 / n;
  std::printf("  moments: mean %.5f  var %.5f  E[z^4] %.4f  max |z| %.3f over %.0f values\n", mean, var, kurt,
              zmax, n);
  expect(std::fabs(mean) < 5.0 / std::sqrt(n), "box_muller: mean 0");
  expect(std::fabs(var - 1.0) < 5.0 * std::sqrt(2.0 / n), "box_muller: variance 1");
  expect(std::fabs(kurt - 3.0) < 5.0 * std::sqrt(96.0 / n), "box_muller: fourth moment 3");
  expect(zmax < 6.67, "box_muller: |z| <= sqrt(64 ln 2)");
}

}  // namespace

int main() {
  test_known_answers();
  test_counter_layout();
  test_box_muller();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all philox.h checks passed\n");
  return 0;
}
