/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * ignore-exit: echoes every configuration as a state (so a test sees it
 * serve), and never returns from main: once the agent asks it to exit, it
 * logs so on stderr and keeps calling EVP_processEvent, which answers
 * EVP_SHOULDEXIT at once, for ever. Only the runtime's stop grace ends it.
 */

#include "test-module.h"

static const char NAME[] = "ignore-exit";

static void on_configuration(const char *topic, const void *config,
			     size_t len, void *user)
{
	struct EVP_client *h = user;
	char *value = copy_text(config, len);
	if (value != NULL &&
	    EVP_sendState(h, topic, value, len, free_when_sent, value) != EVP_OK)
		free(value);
}

int main(void)
{
	struct EVP_client *h = start(NAME);
	EVP_setConfigurationCallback(h, on_configuration, h);
	int told = 0;
	for (;;) {
		if (EVP_processEvent(h, 1000) == EVP_SHOULDEXIT && !told) {
			fprintf(stderr, "%s: asked to exit; staying\n", NAME);
			told = 1;
		}
	}
}
