/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * hog: at start, allocates memory 1 MiB at a time, writing to every block,
 * until malloc fails (the linear memory cannot grow any more: the runtime's
 * limit). If it is still running then, it reports the state `allocated` =
 * how many MiB it got, and serves until the agent asks it to exit.
 */

#include "test-module.h"

static const char NAME[] = "hog";
static const size_t BLOCK = 1024 * 1024;

/* The last block; each block starts with a pointer to the one before. */
static char *volatile kept;

int main(void)
{
	struct EVP_client *h = start(NAME);
	unsigned long mib = 0;
	for (;;) {
		char *block = malloc(BLOCK);
		if (block == NULL)
			break;
		/* Written, so the memory is really used, not just reserved. */
		memset(block, 0xa5, BLOCK);
		/* Chained from a global, so the compiler must keep every block. */
		char *previous = kept;
		memcpy(block, &previous, sizeof(previous));
		kept = block;
		mib++;
	}
	fprintf(stderr, "%s: malloc failed after %lu MiB\n", NAME, mib);
	/* Small enough to fit in what is left. */
	static char count[24];
	int len = snprintf(count, sizeof(count), "%lu", mib);
	EVP_sendState(h, "allocated", count, len, free_when_sent, NULL);
	return serve_until_exit(NAME, h);
}
