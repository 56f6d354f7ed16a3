/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * self-exit: at its first configuration (any topic) it reports the state
 * `leaving` = "bye", waits until the agent has taken it, and returns 0 from
 * main without being asked to: the instance is then `self-exiting`, and
 * stays so.
 */

#include "test-module.h"

static const char NAME[] = "self-exit";

static int reported;

static void on_reported(EVP_STATE_CALLBACK_REASON reason, void *user)
{
	(void)reason, (void)user;
	reported = 1;
}

int main(void)
{
	struct EVP_client *h = start(NAME);
	if (!await_configuration(NAME, h))
		return 0;
	static const char bye[] = "bye";
	EVP_sendState(h, "leaving", bye, sizeof(bye) - 1, on_reported, NULL);
	while (!reported)
		if (EVP_processEvent(h, -1) == EVP_SHOULDEXIT)
			break;
	fprintf(stderr, "%s: returning from main\n", NAME);
	return 0;
}
