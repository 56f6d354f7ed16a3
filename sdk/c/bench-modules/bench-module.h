/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * What the bench modules share: the main loop of a module that does one run
 * each time its configuration topic is set to a count.
 */

#ifndef EVP_BENCH_MODULE_H
#define EVP_BENCH_MODULE_H

#include "../test-modules/test-module.h"

/* The topic serve_runs watches, and the count it last asked for (0: idle). */
static const char *bench_topic;
static unsigned long long bench_wanted;

static void bench_on_configuration(const char *topic, const void *config,
				   size_t len, void *user)
{
	(void)user;
	if (strcmp(topic, bench_topic) != 0)
		return;
	char *text = copy_text(config, len);
	if (text == NULL)
		return;
	/* Surrounding spaces and quotes are allowed, as "1000" in JSON. */
	bench_wanted = strtoull(text + strspn(text, " \""), NULL, 10);
	free(text);
}

/* Connects, then calls run(h, n) each time the configuration `topic` is set
 * to a count n (decimal text), between events; returns main's status, 0,
 * when the agent asks the module to exit or a run returns 0. */
static inline int serve_runs(const char *name, const char *topic,
			     int (*run)(struct EVP_client *h,
					unsigned long long n))
{
	struct EVP_client *h = start(name);
	bench_topic = topic;
	EVP_setConfigurationCallback(h, bench_on_configuration, NULL);
	for (;;) {
		EVP_RESULT r = EVP_processEvent(h, 100);
		if (r == EVP_SHOULDEXIT)
			break;
		unsigned long long n = bench_wanted;
		bench_wanted = 0;
		if (n > 0 && !run(h, n))
			break;
	}
	fprintf(stderr, "%s: leaving\n", name);
	return 0;
}

#endif /* EVP_BENCH_MODULE_H */
