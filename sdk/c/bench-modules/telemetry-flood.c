/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * telemetry-flood (the wasm-telemetry benchmark): the configuration `flood` =
 * N (decimal text) makes N EVP_sendTelemetry calls, each the one entry `v`
 * with a 100-byte JSON string, as fast as it can: it processes events only
 * when the agent answers EVP_AGAIN (then retries). When every callback came
 * back it reports the state `flood` =
 * {"accepted":N,"again":A,"sent":S,"denied":D}. Behaves as the Rust
 * evp-test-telemetry-flood.
 */

#include "bench-module.h"

static const char NAME[] = "telemetry-flood";

/* 100 bytes of JSON: a string of 98 characters and its quotes. */
static const char VALUE[] =
	"\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
	"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"";
_Static_assert(sizeof(VALUE) == 101, "a 100-byte value");

/* Every call sends this entry: static, so it outlives every callback. */
static const struct EVP_telemetry_entry ENTRY = {.key = "v", .value = VALUE};

/* Callbacks of the current run. */
static unsigned long long sent, denied;

static void on_sent(EVP_TELEMETRY_CALLBACK_REASON reason, void *user)
{
	(void)user;
	if (reason == EVP_TELEMETRY_CALLBACK_REASON_SENT)
		sent++;
	else
		denied++;
}

/* Processes one event, briefly: room may come from another instance
 * draining its queue. Returns 0 when the agent asks the module to exit. */
static int pump(struct EVP_client *h)
{
	return EVP_processEvent(h, 5) != EVP_SHOULDEXIT;
}

/* Floods `n` calls, waits for their callbacks and reports the tally.
 * Returns 0 when the agent asked the module to exit meanwhile. */
static int run(struct EVP_client *h, unsigned long long n)
{
	fprintf(stderr, "%s: flooding %llu telemetry calls\n", NAME, n);
	unsigned long long accepted = 0, again = 0;
	sent = denied = 0;
	while (accepted < n) {
		EVP_RESULT r = EVP_sendTelemetry(h, &ENTRY, 1, on_sent, NULL);
		if (r == EVP_OK) {
			accepted++;
			continue;
		}
		if (r != EVP_AGAIN) {
			fprintf(stderr, "%s: telemetry refused: %s\n", NAME,
				result_name(r));
			return 0;
		}
		again++;
		if (!pump(h))
			return 0;
	}
	while (sent + denied < accepted)
		if (!pump(h))
			return 0;
	char *report = malloc(128);
	if (report == NULL)
		return 0;
	int len = snprintf(report, 128,
			   "{\"accepted\":%llu,\"again\":%llu,\"sent\":%llu,"
			   "\"denied\":%llu}",
			   accepted, again, sent, denied);
	fprintf(stderr, "%s: done: %s\n", NAME, report);
	EVP_sendState(h, "flood", report, (size_t)len, free_when_sent, report);
	return 1;
}

int main(void)
{
	return serve_runs(NAME, "flood", run);
}
