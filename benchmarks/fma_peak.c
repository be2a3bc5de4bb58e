/* Peak fp32 FMA throughput of this CPU, one thread per core: 12 independent AVX2 FMA chains per thread
 * (enough to cover FMA latency on two FMA pipes), so the loop is bound by FMA issue rate only.
 * Built and run by benchmarks/ort_profile.py:  cc -O2 -mavx2 -mfma -pthread fma_peak.c -o fma_peak
 * Prints one line: "<threads> <GFLOP/s summed over threads>". */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define CHAINS 12
#define STEPS 30000000L

static void *chain_fmas(void *result) {
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
    double seconds = (end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) * 1e-9;
    /* 8 lanes x 2 flops per FMA; "total" keeps the chains live */
    *(double *)result = (double)STEPS * CHAINS * 16 / seconds / 1e9 + (total == 1.2345f ? 1e-12 : 0);
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    if (threads < 1 || threads > 256) return 2;
    pthread_t ids[256];
    double rates[256], sum = 0;
    for (int t = 0; t < threads; t++) pthread_create(&ids[t], NULL, chain_fmas, &rates[t]);
    for (int t = 0; t < threads; t++) {
        pthread_join(ids[t], NULL);
        sum += rates[t];
    }
    printf("%d %.2f\n", threads, sum);
    return 0;
}
