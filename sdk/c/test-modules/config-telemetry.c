/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * config-telemetry: every configuration (topic, value) is sent as one
 * telemetry entry with key `topic` and the value's text (the agent sends a
 * value that is not JSON as a JSON string).
 */

#include "test-module.h"

static const char NAME[] = "config-telemetry";

/* One telemetry call's entry and the strings it points to, kept until its
 * callback. */
struct pending {
	struct EVP_telemetry_entry entry;
	char *key;
	char *value;
};

static void on_sent(EVP_TELEMETRY_CALLBACK_REASON reason, void *user)
{
	struct pending *p = user;
	fprintf(stderr, "%s: telemetry %s: reason %d\n", NAME, p->key,
		(int)reason);
	free(p->key);
	free(p->value);
	free(p);
}

static void on_configuration(const char *topic, const void *config,
			     size_t len, void *user)
{
	struct EVP_client *h = user;
	struct pending *p = malloc(sizeof(*p));
	if (p == NULL)
		return;
	p->key = copy_text(topic, strlen(topic));
	p->value = copy_text(config, len);
	if (p->key == NULL || p->value == NULL) {
		on_sent(EVP_TELEMETRY_CALLBACK_REASON_ERROR, p);
		return;
	}
	p->entry.key = p->key;
	p->entry.value = p->value;
	fprintf(stderr, "%s: configuration %s -> telemetry\n", NAME, topic);
	EVP_RESULT r = EVP_sendTelemetry(h, &p->entry, 1, on_sent, p);
	if (r != EVP_OK) {
		fprintf(stderr, "%s: telemetry %s refused: %s\n", NAME, topic,
			result_name(r));
		on_sent(EVP_TELEMETRY_CALLBACK_REASON_ERROR, p);
	}
}

int main(void)
{
	struct EVP_client *h = start(NAME);
	EVP_setConfigurationCallback(h, on_configuration, h);
	return serve_until_exit(NAME, h);
}
