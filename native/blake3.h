/* BLAKE3 (unkeyed hash mode, 32-byte output), written from the BLAKE3 specification. */
#ifndef CLOWDER_BLAKE3_H
#define CLOWDER_BLAKE3_H

#include <stddef.h>
#include <stdint.h>

#define BLAKE3_OUT_LEN 32

/* Must be called once before blake3() (picks the SIMD kernel for this CPU). Idempotent. */
void blake3_init(void);

/* Name of the kernel in use: "avx512", "avx2", "sse41" or "portable". blake3_init() picks the fastest
 * this CPU runs. */
const char *blake3_kernel(void);

/* Fills names[] with the kernels this CPU runs, fastest first ("portable" last); returns how many. */
size_t blake3_kernels(const char *names[4]);

/* Makes `name` (one of blake3_kernels()) the kernel every later blake3() uses, in every thread; returns
 * -1 (and changes nothing) for a name this CPU cannot run. All kernels give the same hashes, so this
 * only changes speed: it is for tests and benchmarks. */
int blake3_use_kernel(const char *name);

/* The BLAKE3 hash of len bytes at in. Thread-safe, no allocation. */
void blake3(const uint8_t *in, size_t len, uint8_t out[BLAKE3_OUT_LEN]);

#endif
