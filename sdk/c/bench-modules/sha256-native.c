/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * sha256-native (the wasm-compute benchmark's reference): the kernel of
 * sha256.h built for the host with `clang -O2`. `sha256-native N` hashes
 * N MiB of the bench input and prints {"bytes":B,"ns":T,"digest":"<hex>"},
 * as the WASM module reports it.
 */

#include <stdlib.h>

#include "sha256.h"

int main(int argc, char **argv)
{
	size_t len = (size_t)strtoull(argc > 1 ? argv[1] : "16", NULL, 10) << 20;
	uint8_t *data = malloc(len);
	if (data == NULL)
		return 1;
	sha256_bench_input(data, len);
	char report[160];
	sha256_bench_run(data, len, report, sizeof(report));
	puts(report);
	free(data);
	return 0;
}
