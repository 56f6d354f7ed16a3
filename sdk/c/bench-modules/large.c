/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * large (the wasm-load benchmark): about 1 MiB of WASM code, to time how
 * long runtimed-wasm takes to compile a module of that size and to load it
 * again from its cache. The preprocessor writes 1024 distinct functions
 * (names and constants from octal digits), each a straight run of integer
 * mixing steps on two branches; main calls every one of them through a
 * table (so none is dropped), logs the checksum and serves until the agent
 * asks it to exit.
 */

#include "../test-modules/test-module.h"
#include <stdint.h>

/* One mixing step with the constant k: a multiply, a rotate and adds. */
#define MIX(x, k)                                                              \
	x = (x ^ (uint32_t)(k)) * 0x9E3779B1u;                                 \
	x = (x << 13 | x >> 19) + ((uint32_t)(k) ^ 0x7F4A7C15u);
#define MIX8(x, k)                                                             \
	MIX(x, (k) * 8 + 1) MIX(x, (k) * 8 + 2) MIX(x, (k) * 8 + 3)            \
	MIX(x, (k) * 8 + 4) MIX(x, (k) * 8 + 5) MIX(x, (k) * 8 + 6)            \
	MIX(x, (k) * 8 + 7) MIX(x, (k) * 8 + 8)

/* The function numbered by the octal digits a b c d. */
#define FN(a, b, c, d)                                                         \
	static uint32_t f_##a##b##c##d(uint32_t x)                             \
	{                                                                      \
		if (x & 1) {                                                   \
			MIX8(x, 0##a##b##c##d * 4 + 0)                         \
			MIX8(x, 0##a##b##c##d * 4 + 1)                         \
		} else {                                                       \
			MIX8(x, 0##a##b##c##d * 4 + 2)                         \
			MIX8(x, 0##a##b##c##d * 4 + 3)                         \
		}                                                              \
		return x;                                                      \
	}
#define FN8(m, a, b, c)                                                        \
	m(a, b, c, 0) m(a, b, c, 1) m(a, b, c, 2) m(a, b, c, 3) m(a, b, c, 4)  \
	m(a, b, c, 5) m(a, b, c, 6) m(a, b, c, 7)
#define FN64(m, a, b)                                                          \
	FN8(m, a, b, 0) FN8(m, a, b, 1) FN8(m, a, b, 2) FN8(m, a, b, 3)        \
	FN8(m, a, b, 4) FN8(m, a, b, 5) FN8(m, a, b, 6) FN8(m, a, b, 7)
#define FN512(m, a)                                                            \
	FN64(m, a, 0) FN64(m, a, 1) FN64(m, a, 2) FN64(m, a, 3)                \
	FN64(m, a, 4) FN64(m, a, 5) FN64(m, a, 6) FN64(m, a, 7)
#define FN1024(m) FN512(m, 0) FN512(m, 1)

FN1024(FN)

#define ENTRY(a, b, c, d) f_##a##b##c##d,
static uint32_t (*const FUNCTIONS[])(uint32_t) = {FN1024(ENTRY)};

static const char NAME[] = "large";

int main(void)
{
	uint32_t sum = 0;
	for (size_t i = 0; i < sizeof(FUNCTIONS) / sizeof(FUNCTIONS[0]); i++)
		sum += FUNCTIONS[i](sum + (uint32_t)i);
	printf("%s: %zu functions, checksum %08x\n", NAME,
	       sizeof(FUNCTIONS) / sizeof(FUNCTIONS[0]), (unsigned)sum);
	struct EVP_client *h = start(NAME);
	return serve_until_exit(NAME, h);
}
