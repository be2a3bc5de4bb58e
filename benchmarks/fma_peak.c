/* Peak fp32 FMA throughput of this CPU, one thread per core: 12 independent FMA chains per thread
 * (enough to cover FMA latency on two FMA pipes), so the loop is bound by FMA issue rate only.
 * Measured with 256-bit AVX2 FMAs and, where the CPU has AVX-512F, with 512-bit FMAs too: which is
 * faster depends on the core (some run 512-bit FMAs as two 256-bit halves), and the floor must use the
 * widest one ONNX Runtime's kernels can use here.
 * Built and run by benchmarks/ort_profile.py:  cc -O2 -pthread fma_peak.c -o fma_peak
 * Prints one line: "<threads> <AVX2 GFLOP/s> <AVX-512 GFLOP/s, 0 without AVX-512F>" (summed over threads). */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define CHAINS 12
#define STEPS 30000000L

static double seconds_between(struct timespec start, struct timespec end) {
    return (end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) * 1e-9;
}

__attribute__((target("avx2,fma"))) static void *chain_fmas_avx2(void *result) {
    __m256 acc[CHAINS];
    const __m256 scale = _mm256_set1_ps(1.0000001f), shift = _mm256_set1_ps(1e-7f);
    for (int k = 0; k < CHAINS; k++) acc[k] = _mm256_set1_ps((float)k);
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long i = 0; i < STEPS; i++) {
#pragma GCC unroll 12
        for (int k = 0; k < CHAINS; k++) acc[k] = _mm256_fmadd_ps(acc[k], scale, shift);
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    float sink[8], total = 0;
    for (int k = 0; k < CHAINS; k++) {
        _mm256_storeu_ps(sink, acc[k]);
        total += sink[0];
    }
    /* 8 lanes x 2 flops per FMA; "total" keeps the chains live */
    *(double *)result = (double)STEPS * CHAINS * 16 / seconds_between(start, end) / 1e9
                        + (total == 1.2345f ? 1e-12 : 0);
    return NULL;
}

__attribute__((target("avx512f"))) static void *chain_fmas_avx512(void *result) {
    __m512 acc[CHAINS];
    const __m512 scale = _mm512_set1_ps(1.0000001f), shift = _mm512_set1_ps(1e-7f);
    for (int k = 0; k < CHAINS; k++) acc[k] = _mm512_set1_ps((float)k);
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long i = 0; i < STEPS; i++) {
#pragma GCC unroll 12
        for (int k = 0; k < CHAINS; k++) acc[k] = _mm512_fmadd_ps(acc[k], scale, shift);
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    float sink[16], total = 0;
    for (int k = 0; k < CHAINS; k++) {
        _mm512_storeu_ps(sink, acc[k]);
        total += sink[0];
    }
    /* 16 lanes x 2 flops per FMA */
    *(double *)result = (double)STEPS * CHAINS * 32 / seconds_between(start, end) / 1e9
                        + (total == 1.2345f ? 1e-12 : 0);
    return NULL;
}

static double summed_rate(void *(*kernel)(void *), int threads) {
    pthread_t ids[256];
    double rates[256], sum = 0;
    for (int t = 0; t < threads; t++) pthread_create(&ids[t], NULL, kernel, &rates[t]);
    for (int t = 0; t < threads; t++) {
        pthread_join(ids[t], NULL);
        sum += rates[t];
    }
    return sum;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    if (threads < 1 || threads > 256) return 2;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 3;
    double avx2 = summed_rate(chain_fmas_avx2, threads);
    double avx512 = __builtin_cpu_supports("avx512f") ? summed_rate(chain_fmas_avx512, threads) : 0.0;
    printf("%d %.2f %.2f\n", threads, avx2, avx512);
    return 0;
}
