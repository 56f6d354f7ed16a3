/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * spin: connects, then loops for ever without calling the SDK again (or
 * anything else): it never sees the exit request, so only the runtime's
 * interruption of guest code after the stop grace ends it.
 */

#include "test-module.h"

static const char NAME[] = "spin";

int main(void)
{
	start(NAME);
	fprintf(stderr, "%s: spinning\n", NAME);
	/* volatile, so the compiler keeps the loop and its work. */
	volatile unsigned long long turns = 0;
	for (;;)
		turns++;
}
