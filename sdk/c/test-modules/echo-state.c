/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * echo-state: every configuration (topic, value) is sent back as the state
 * (topic, value). When the agent refuses that state, the state
 * "<topic>/refused" says the code it answered (e.g. "EVP_TOOBIG").
 */

#include "test-module.h"

static const char NAME[] = "echo-state";

static void on_configuration(const char *topic, const void *config,
			     size_t len, void *user)
{
	struct EVP_client *h = user;
	fprintf(stderr, "%s: configuration %s (%zu bytes)\n", NAME, topic, len);
	char *value = copy_text(config, len);
	if (value == NULL)
		return;
	EVP_RESULT r = EVP_sendState(h, topic, value, len, free_when_sent, value);
	if (r == EVP_OK)
		return;
	free(value);
	fprintf(stderr, "%s: state %s refused: %s\n", NAME, topic,
		result_name(r));
	/* Said to the hub too, so a test sees what the module was told. */
	const char *code = result_name(r);
	char refused[256];
	snprintf(refused, sizeof(refused), "%s/refused", topic);
	/* `code` is static: nothing to free when it is sent. */
	EVP_sendState(h, refused, code, strlen(code), free_when_sent, NULL);
}

int main(void)
{
	struct EVP_client *h = start(NAME);
	EVP_setConfigurationCallback(h, on_configuration, h);
	return serve_until_exit(NAME, h);
}
