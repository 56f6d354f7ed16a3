/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * The compute kernel of the wasm-compute benchmark, shared word for word by
 * the WASM module (sha256.c) and the native program (sha256-native.c): a
 * plain SHA-256 (FIPS 180-4), the deterministic input both hash, and one
 * timed run that reports its figures as one JSON object.
 */

#ifndef EVP_BENCH_SHA256_H
#define EVP_BENCH_SHA256_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

static const uint32_t SHA256_K[64] = {
	0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1,
	0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3,
	0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
	0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
	0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
	0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
	0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
	0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
	0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
	0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
	0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define SHA256_ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

/* One 64-byte block into the state. */
static void sha256_block(uint32_t state[8], const uint8_t *block)
{
	uint32_t w[64];
	for (int i = 0; i < 16; i++)
		w[i] = (uint32_t)block[4 * i] << 24 |
		       (uint32_t)block[4 * i + 1] << 16 |
		       (uint32_t)block[4 * i + 2] << 8 | block[4 * i + 3];
	for (int i = 16; i < 64; i++) {
		uint32_t s0 = SHA256_ROTR(w[i - 15], 7) ^
			      SHA256_ROTR(w[i - 15], 18) ^ (w[i - 15] >> 3);
		uint32_t s1 = SHA256_ROTR(w[i - 2], 17) ^
			      SHA256_ROTR(w[i - 2], 19) ^ (w[i - 2] >> 10);
		w[i] = w[i - 16] + s0 + w[i - 7] + s1;
	}
	uint32_t a = state[0], b = state[1], c = state[2], d = state[3];
	uint32_t e = state[4], f = state[5], g = state[6], h = state[7];
	for (int i = 0; i < 64; i++) {
		uint32_t s1 = SHA256_ROTR(e, 6) ^ SHA256_ROTR(e, 11) ^
			      SHA256_ROTR(e, 25);
		uint32_t ch = (e & f) ^ (~e & g);
		uint32_t t1 = h + s1 + ch + SHA256_K[i] + w[i];
		uint32_t s0 = SHA256_ROTR(a, 2) ^ SHA256_ROTR(a, 13) ^
			      SHA256_ROTR(a, 22);
		uint32_t maj = (a & b) ^ (a & c) ^ (b & c);
		uint32_t t2 = s0 + maj;
		h = g, g = f, f = e, e = d + t1;
		d = c, c = b, b = a, a = t1 + t2;
	}
	state[0] += a, state[1] += b, state[2] += c, state[3] += d;
	state[4] += e, state[5] += f, state[6] += g, state[7] += h;
}

/* The SHA-256 of `len` bytes, as 32 bytes into `digest`. */
static void sha256(const uint8_t *data, size_t len, uint8_t digest[32])
{
	uint32_t state[8] = {
		0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
		0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
	};
	size_t whole = len - len % 64;
	for (size_t i = 0; i < whole; i += 64)
		sha256_block(state, data + i);
	/* The tail, the 0x80 marker and the bit length, in one or two blocks. */
	uint8_t last[128] = {0};
	size_t tail = len - whole;
	for (size_t i = 0; i < tail; i++)
		last[i] = data[whole + i];
	last[tail] = 0x80;
	size_t blocks = tail < 56 ? 1 : 2;
	uint64_t bits = (uint64_t)len * 8;
	for (int i = 0; i < 8; i++)
		last[blocks * 64 - 1 - i] = (uint8_t)(bits >> (8 * i));
	for (size_t i = 0; i < blocks; i++)
		sha256_block(state, last + 64 * i);
	for (int i = 0; i < 8; i++) {
		digest[4 * i] = (uint8_t)(state[i] >> 24);
		digest[4 * i + 1] = (uint8_t)(state[i] >> 16);
		digest[4 * i + 2] = (uint8_t)(state[i] >> 8);
		digest[4 * i + 3] = (uint8_t)state[i];
	}
}

/* The input both builds hash: a fixed pseudo-random byte sequence. */
static void sha256_bench_input(uint8_t *data, size_t len)
{
	uint32_t x = 0x12345678;
	for (size_t i = 0; i < len; i++) {
		/* xorshift32 */
		x ^= x << 13, x ^= x >> 17, x ^= x << 5;
		data[i] = (uint8_t)x;
	}
}

/* Monotonic nanoseconds (WASI's clock_time_get in the WASM build). */
static uint64_t sha256_bench_now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* Hashes `len` bytes of `data` (already the bench input), timing the hash
 * only, and writes {"bytes":N,"ns":T,"digest":"<hex>"} into `out`; returns
 * its length. */
static int sha256_bench_run(const uint8_t *data, size_t len, char *out,
			    size_t out_len)
{
	uint8_t digest[32];
	uint64_t started = sha256_bench_now_ns();
	sha256(data, len, digest);
	uint64_t took = sha256_bench_now_ns() - started;
	char hex[65];
	for (int i = 0; i < 32; i++)
		snprintf(hex + 2 * i, 3, "%02x", digest[i]);
	return snprintf(out, out_len,
			"{\"bytes\":%zu,\"ns\":%llu,\"digest\":\"%s\"}", len,
			(unsigned long long)took, hex);
}

#endif /* EVP_BENCH_SHA256_H */
