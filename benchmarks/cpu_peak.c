/* The arithmetic peak of one CPU core, from the instructions that matmul kernels are built on.
 *
 * fp32: AVX-512 (or AVX2) fused multiply-add; bf16: AVX512-BF16's VDPBF16PS, which multiplies
 * 32 bf16 pairs and accumulates them into 16 fp32 lanes (64 FLOPs). Twelve independent
 * accumulators hide the instructions' latency, so the loop runs at issue throughput: no
 * library kernel can go faster on this core. Built and run by benchmarks/cpu_peak.py.
 * Prints one line per instruction: "<name> <GFLOP/s>".
 */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define ACCUMULATORS 12

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* the empty asm makes the compiler treat the inputs as changing, so the loop is not folded */
__attribute__((target("avx512f"))) static double fp32_avx512(long iterations) {
    __m512 acc[ACCUMULATORS];
    for (int k = 0; k < ACCUMULATORS; k++) acc[k] = _mm512_setzero_ps();
    __m512 a = _mm512_set1_ps(1.0f), b = _mm512_set1_ps(1e-9f);
    double start = seconds();
    for (long i = 0; i < iterations; i++) {
#pragma GCC unroll 12
        for (int k = 0; k < ACCUMULATORS; k++) acc[k] = _mm512_fmadd_ps(acc[k], a, b);
        __asm__ volatile("" : "+v"(a), "+v"(b));
    }
    double elapsed = seconds() - start;
    float sink = 0;
    for (int k = 0; k < ACCUMULATORS; k++) sink += _mm512_reduce_add_ps(acc[k]);
    if (sink == 42.0f) puts("");
    return iterations * ACCUMULATORS * 32.0 / elapsed / 1e9;
}

__attribute__((target("avx2,fma"))) static double fp32_avx2(long iterations) {
    __m256 acc[ACCUMULATORS];
    for (int k = 0; k < ACCUMULATORS; k++) acc[k] = _mm256_setzero_ps();
    __m256 a = _mm256_set1_ps(1.0f), b = _mm256_set1_ps(1e-9f);
    double start = seconds();
    for (long i = 0; i < iterations; i++) {
#pragma GCC unroll 12
        for (int k = 0; k < ACCUMULATORS; k++) acc[k] = _mm256_fmadd_ps(acc[k], a, b);
        __asm__ volatile("" : "+x"(a), "+x"(b));
    }
    double elapsed = seconds() - start;
    float sink = 0;
    float lanes[8];
    for (int k = 0; k < ACCUMULATORS; k++) {
        _mm256_storeu_ps(lanes, acc[k]);
        sink += lanes[0];
    }
    if (sink == 42.0f) puts("");
    return iterations * ACCUMULATORS * 16.0 / elapsed / 1e9;
}

__attribute__((target("avx512f,avx512bf16"))) static double bf16_avx512(long iterations) {
    __m512 acc[ACCUMULATORS];
    for (int k = 0; k < ACCUMULATORS; k++) acc[k] = _mm512_setzero_ps();
    __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3f80);
    double start = seconds();
    for (long i = 0; i < iterations; i++) {
#pragma GCC unroll 12
        for (int k = 0; k < ACCUMULATORS; k++) acc[k] = _mm512_dpbf16_ps(acc[k], a, b);
        __asm__ volatile("" : "+v"(a), "+v"(b));
    }
    double elapsed = seconds() - start;
    float sink = 0;
    for (int k = 0; k < ACCUMULATORS; k++) sink += _mm512_reduce_add_ps(acc[k]);
    if (sink == 42.0f) puts("");
    return iterations * ACCUMULATORS * 64.0 / elapsed / 1e9;
}

int main(int argc, char **argv) {
    long iterations = argc > 1 ? atol(argv[1]) : 50000000;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        printf("fp32-avx512-fma %.2f\n", fp32_avx512(iterations));
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        printf("fp32-avx2-fma %.2f\n", fp32_avx2(iterations));
    }
    if (__builtin_cpu_supports("avx512bf16")) {
        printf("bf16-avx512-dpbf16 %.2f\n", bf16_avx512(iterations));
    }
    return 0;
}
