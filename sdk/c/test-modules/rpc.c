/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * rpc: the direct command `echo` is answered OK with its params as the
 * response; any other method gets METHOD_NOT_FOUND with
 * {"error":"unknown method <method>"}.
 */

#include "test-module.h"

static const char NAME[] = "rpc";

/* Frees the response once the agent has it: it must live until then. */
static void on_answered(EVP_RPC_RESPONSE_CALLBACK_REASON reason, void *response)
{
	(void)reason;
	free(response);
}

/* {"error":"unknown method <method>"}, the method escaped as a JSON string. */
static char *unknown_method(const char *method)
{
	static const char head[] = "{\"error\":\"unknown method ";
	static const char tail[] = "\"}";
	char *out = malloc(sizeof(head) + 2 * strlen(method) + sizeof(tail));
	if (out == NULL)
		return NULL;
	char *w = out + sizeof(head) - 1;
	memcpy(out, head, sizeof(head) - 1);
	for (const char *c = method; *c != '\0'; c++) {
		/* Control characters become spaces: this is only an error text. */
		char ch = (unsigned char)*c < 0x20 ? ' ' : *c;
		if (ch == '"' || ch == '\\')
			*w++ = '\\';
		*w++ = ch;
	}
	memcpy(w, tail, sizeof(tail));
	return out;
}

static void on_command(EVP_RPC_ID id, const char *method, const char *params,
		       void *user)
{
	struct EVP_client *h = user;
	EVP_RPC_RESPONSE_STATUS status;
	char *response;
	if (strcmp(method, "echo") == 0) {
		status = EVP_RPC_RESPONSE_STATUS_OK;
		response = copy_text(params, strlen(params));
	} else {
		status = EVP_RPC_RESPONSE_STATUS_METHOD_NOT_FOUND;
		response = unknown_method(method);
	}
	if (response == NULL)
		return;
	fprintf(stderr, "%s: command %llu %s: status %d\n", NAME,
		(unsigned long long)id, method, (int)status);
	EVP_RESULT r = EVP_sendRpcResponse(h, id, response, status, on_answered,
					   response);
	if (r != EVP_OK) {
		fprintf(stderr, "%s: answer to %llu refused: %s\n", NAME,
			(unsigned long long)id, result_name(r));
		free(response);
	}
}

int main(void)
{
	struct EVP_client *h = start(NAME);
	EVP_setRpcCallback(h, on_command, h);
	return serve_until_exit(NAME, h);
}
