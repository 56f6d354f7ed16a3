/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * trap: runs until its first configuration (any topic) has been delivered,
 * then executes an `unreachable` instruction in main: a WASM trap, which
 * the runtime reports as the instance's `error`.
 */

#include "test-module.h"

static const char NAME[] = "trap";

int main(void)
{
	struct EVP_client *h = start(NAME);
	if (!await_configuration(NAME, h))
		return 0;
	fprintf(stderr, "%s: trapping\n", NAME);
	__builtin_trap();
}
