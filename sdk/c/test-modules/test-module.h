/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * What the C test modules share: the start line, copies of the bytes the SDK
 * hands to callbacks, waiting for the first configuration, and the main loop
 * of a module that only serves callbacks. Each module is one .c file next to this one.
 */

#ifndef EVP_TEST_MODULE_H
#define EVP_TEST_MODULE_H

#include <evp/sdk.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Logs the one line every module writes to stdout when it starts (so log
 * capture can be checked), then connects to the agent. */
static inline struct EVP_client *start(const char *name)
{
	printf("%s: started\n", name);
	/* stdout is a pipe, so fully buffered: the line must not wait. */
	fflush(stdout);
	return EVP_initialize();
}

/* A NUL-terminated copy of `len` bytes, or NULL when memory is short. */
static inline char *copy_text(const void *data, size_t len)
{
	char *text = malloc(len + 1);
	if (text != NULL) {
		memcpy(text, data, len);
		text[len] = '\0';
	}
	return text;
}

/* The C name of an SDK result, as the hub-side tests expect to read it. */
static inline const char *result_name(EVP_RESULT r)
{
	static const char *const names[] = {
		"EVP_OK",    "EVP_SHOULDEXIT", "EVP_TIMEDOUT",
		"EVP_ERROR", "EVP_INVAL",      "EVP_NOMEM",
		"EVP_TOOBIG", "EVP_AGAIN",     "EVP_AGENT_PROTOCOL_ERROR",
		"EVP_EXIST", "EVP_FAULT",      "EVP_DENIED",
		"EVP_NOTSUP",
	};
	if ((unsigned)r < sizeof(names) / sizeof(names[0]))
		return names[r];
	return "EVP_UNKNOWN";
}

/* A state callback that frees the buffer the state was sent from: the buffer
 * must live until the callback (the SDK may keep a pointer to it). */
static inline void free_when_sent(EVP_STATE_CALLBACK_REASON reason, void *buffer)
{
	(void)reason;
	free(buffer);
}

/* Sends the state `topic` = a copy of `text`, freed once sent. */
static inline void send_text_state(struct EVP_client *h, const char *topic,
				   const char *text)
{
	char *copy = copy_text(text, strlen(text));
	if (copy != NULL &&
	    EVP_sendState(h, topic, copy, strlen(copy), free_when_sent, copy) != EVP_OK)
		free(copy);
}

/* Processes events until the agent asks the module to exit; returns main's
 * status: 0 then, 1 when the SDK fails otherwise. */
static inline int serve_until_exit(const char *name, struct EVP_client *h)
{
	for (;;) {
		EVP_RESULT r = EVP_processEvent(h, -1);
		if (r == EVP_SHOULDEXIT) {
			fprintf(stderr, "%s: leaving\n", name);
			return 0;
		}
		if (r != EVP_OK && r != EVP_TIMEDOUT) {
			fprintf(stderr, "%s: EVP_processEvent: %s\n", name,
				result_name(r));
			return 1;
		}
	}
}

/* Set by on_first_configuration. */
static int configured;

static inline void on_first_configuration(const char *topic,
					  const void *config, size_t len,
					  void *name)
{
	(void)config, (void)len;
	fprintf(stderr, "%s: configuration %s\n", (const char *)name, topic);
	configured = 1;
}

/* Registers a configuration callback and processes events until the first
 * configuration (any topic) has come; 0 if the agent asks the module to
 * exit first. */
static inline int await_configuration(const char *name, struct EVP_client *h)
{
	EVP_setConfigurationCallback(h, on_first_configuration, (void *)name);
	while (!configured)
		if (EVP_processEvent(h, -1) == EVP_SHOULDEXIT)
			return 0;
	return 1;
}

#endif /* EVP_TEST_MODULE_H */
