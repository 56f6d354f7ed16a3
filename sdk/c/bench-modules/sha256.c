/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * sha256 (the wasm-compute benchmark): the configuration `sha256` = N
 * (decimal MiB, surrounding spaces and quotes allowed) hashes N MiB of the
 * bench input with sha256.h and reports the state `sha256` =
 * {"bytes":B,"ns":T,"digest":"<hex>"}, T timing the hash alone. The same
 * kernel runs natively in sha256-native.c.
 */

#include "bench-module.h"
#include "sha256.h"

static const char NAME[] = "sha256";

/* Hashes `mib` MiB and reports the figures; 1 (serve on) even when memory is
 * short, which the log says. */
static int run(struct EVP_client *h, unsigned long long mib)
{
	size_t len = (size_t)mib << 20;
	uint8_t *data = malloc(len);
	char *report = malloc(160);
	if (data == NULL || report == NULL) {
		fprintf(stderr, "%s: no memory for %zu bytes\n", NAME, len);
		free(data);
		free(report);
		return 1;
	}
	sha256_bench_input(data, len);
	int n = sha256_bench_run(data, len, report, 160);
	free(data);
	fprintf(stderr, "%s: %s\n", NAME, report);
	EVP_sendState(h, "sha256", report, (size_t)n, free_when_sent, report);
	return 1;
}

int main(void)
{
	return serve_runs(NAME, "sha256", run);
}
