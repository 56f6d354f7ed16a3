/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * blob: configuration "get" or "put" = a URL makes an HTTP blob operation of
 * the workspace file "blob.bin" (GET into it, PUT from it); once its callback
 * came, the state of the same topic is "reason=R result=N http=S error=E". A
 * request refused at once gives the state "<topic>" = the code (EVP_DENIED).
 */

#include "test-module.h"

static const char NAME[] = "blob";

struct operation {
	struct EVP_client *h;
	char topic[8];
	char *url;
	struct EVP_BlobRequestHttp request;
	struct EVP_BlobLocalStore store;
};

static void on_done(EVP_BLOB_CALLBACK_REASON reason, const void *result,
		    void *user)
{
	struct operation *op = user;
	const struct EVP_BlobResultHttp *r = result;
	char text[128];
	if (r != NULL)
		snprintf(text, sizeof(text), "reason=%d result=%d http=%u error=%d",
			 (int)reason, (int)r->result, r->http_status, r->error);
	else
		snprintf(text, sizeof(text), "reason=%d", (int)reason);
	fprintf(stderr, "%s: %s done: %s\n", NAME, op->topic, text);
	send_text_state(op->h, op->topic, text);
	free(op->url);
	free(op);
}

static char file[1024];

static void on_configuration(const char *topic, const void *config,
			     size_t len, void *user)
{
	struct EVP_client *h = user;
	int put = strcmp(topic, "put") == 0;
	if (!put && strcmp(topic, "get") != 0)
		return;
	struct operation *op = calloc(1, sizeof(*op));
	if (op == NULL)
		return;
	op->h = h;
	snprintf(op->topic, sizeof(op->topic), "%s", topic);
	op->url = copy_text(config, len);
	op->request.url = op->url;
	op->store.filename = file;
	EVP_RESULT r = EVP_blobOperation(h, EVP_BLOB_TYPE_HTTP,
					 put ? EVP_BLOB_OP_PUT : EVP_BLOB_OP_GET,
					 &op->request, &op->store, on_done, op);
	if (r != EVP_OK) {
		send_text_state(h, op->topic, result_name(r));
		free(op->url);
		free(op);
	}
}

int main(void)
{
	struct EVP_client *h = start(NAME);
	snprintf(file, sizeof(file), "%s/blob.bin",
		 EVP_getWorkspaceDirectory(h, EVP_WORKSPACE_TYPE_DEFAULT));
	EVP_setConfigurationCallback(h, on_configuration, h);
	return serve_until_exit(NAME, h);
}
