/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * msg-sender: the configuration `count` = N (decimal text) sends N messages
 * "0".."N-1" on the publish alias `out` (retrying on EVP_AGAIN), then reports
 * the state `sent` = {"sent":S,"errors":E}, S and E counting the SENT and
 * ERROR callbacks of that run. Behaves as the Rust evp-test-msg-sender.
 */

#include "test-module.h"

static const char NAME[] = "msg-sender";
/* The publish alias the messages go to. */
static const char ALIAS[] = "out";

/* The run the last `count` configuration asked for; 0 when idle. */
static unsigned long long wanted;
/* Callbacks of the current run. */
static unsigned long long sent, errors;

static void on_configuration(const char *topic, const void *config,
			     size_t len, void *user)
{
	(void)user;
	if (strcmp(topic, "count") != 0)
		return;
	char *text = copy_text(config, len);
	if (text == NULL)
		return;
	/* Surrounding spaces and quotes are allowed, as "1000" in JSON. */
	const char *digits = text + strspn(text, " \"");
	wanted = strtoull(digits, NULL, 10);
	free(text);
}

/* Counts the callback and frees the payload, which had to live until it. */
static void on_sent(EVP_MESSAGE_SENT_CALLBACK_REASON reason, void *payload)
{
	if (reason == EVP_MESSAGE_SENT_CALLBACK_REASON_SENT)
		sent++;
	else
		errors++;
	free(payload);
}

/* Processes one event, briefly: room may come from another instance
 * draining its queue. Returns 0 when the agent asks the module to exit. */
static int pump(struct EVP_client *h)
{
	return EVP_processEvent(h, 5) != EVP_SHOULDEXIT;
}

/* Sends `n` messages, waits for their callbacks and reports the tally.
 * Returns 0 when the agent asked the module to exit meanwhile. */
static int run(struct EVP_client *h, unsigned long long n)
{
	fprintf(stderr, "%s: sending %llu messages on %s\n", NAME, n, ALIAS);
	sent = errors = 0;
	for (unsigned long long i = 0; i < n;) {
		char *payload = malloc(24);
		if (payload == NULL)
			return 0;
		int len = snprintf(payload, 24, "%llu", i);
		EVP_RESULT r =
			EVP_sendMessage(h, ALIAS, payload, len, on_sent, payload);
		if (r == EVP_OK) {
			i++;
			continue;
		}
		free(payload);
		if (r != EVP_AGAIN) {
			fprintf(stderr, "%s: message %llu refused: %s\n", NAME,
				i, result_name(r));
			return 0;
		}
		if (!pump(h))
			return 0;
	}
	while (sent + errors < n)
		if (!pump(h))
			return 0;
	char *report = malloc(64);
	if (report == NULL)
		return 0;
	int len = snprintf(report, 64, "{\"sent\":%llu,\"errors\":%llu}", sent,
			   errors);
	fprintf(stderr, "%s: done: %s\n", NAME, report);
	EVP_sendState(h, "sent", report, len, free_when_sent, report);
	return 1;
}

int main(void)
{
	struct EVP_client *h = start(NAME);
	EVP_setConfigurationCallback(h, on_configuration, NULL);
	for (;;) {
		EVP_RESULT r = EVP_processEvent(h, 100);
		if (r == EVP_SHOULDEXIT)
			break;
		unsigned long long n = wanted;
		wanted = 0;
		if (n > 0 && !run(h, n))
			break;
	}
	fprintf(stderr, "%s: leaving\n", NAME);
	return 0;
}
