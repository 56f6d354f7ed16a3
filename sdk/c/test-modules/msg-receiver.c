/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * msg-receiver: counts the messages received on any subscribe alias and
 * reports the state `received` = the count (a JSON number), at most every
 * 100 ms and only when it changed. Behaves as the Rust evp-test-msg-receiver.
 */

/* clock_gettime and CLOCK_MONOTONIC are POSIX. */
#define _POSIX_C_SOURCE 200809L

#include <time.h>

#include "test-module.h"

static const char NAME[] = "msg-receiver";
/* Least time between two reports, so a burst is not a burst of states. */
static const long long REPORT_EVERY_MS = 100;

static unsigned long long received;

static void on_message(const char *topic, const void *payload, size_t len,
		       void *user)
{
	(void)topic, (void)payload, (void)len, (void)user;
	received++;
}

static long long now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

int main(void)
{
	struct EVP_client *h = start(NAME);
	EVP_setMessageCallback(h, on_message, NULL);
	unsigned long long reported = 0;
	long long last = now_ms();
	while (EVP_processEvent(h, 100) != EVP_SHOULDEXIT) {
		if (received == reported || now_ms() - last < REPORT_EVERY_MS)
			continue;
		char *count = malloc(24);
		if (count == NULL)
			continue;
		int len = snprintf(count, 24, "%llu", received);
		EVP_RESULT r = EVP_sendState(h, "received", count, len,
					     free_when_sent, count);
		if (r == EVP_OK) {
			reported = received;
			last = now_ms();
		} else {
			fprintf(stderr, "%s: state refused: %s\n", NAME,
				result_name(r));
			free(count);
		}
	}
	fprintf(stderr, "%s: leaving\n", NAME);
	return 0;
}
