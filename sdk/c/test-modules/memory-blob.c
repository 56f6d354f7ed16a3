/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * memory-blob: HTTP blob operations in memory (no file: localStore.filename is
 * NULL, the data goes through the io callback). Configuration topics:
 *
 *   "get..." = URL    GET; the io callback counts the bytes and folds them into
 *                     an FNV-1a hash, in the order they came.
 *   "discard" = URL   GET with a NULL io callback (the blob is dropped).
 *   "put..." = "LEN URL"
 *                     PUT of LEN bytes, byte i being (i * 7) % 251.
 *
 * In a topic with "fail" in it, the io callback answers ERROR at its second
 * call.
 *
 * Once the blob callback came, the state of the same topic is
 * "reason=R result=N http=S error=E len=L fnv=H calls=C" (L: bytes through the
 * io callback, H: their hash, C: io callback calls). A request refused at once
 * gives the state "<topic>" = the code's name.
 */

#include "test-module.h"

static const char NAME[] = "memory-blob";

/* FNV-1a, 32 bits. */
#define FNV_OFFSET 2166136261u
#define FNV_PRIME 16777619u

struct operation {
	struct EVP_client *h;
	char topic[16];
	char *url;
	struct EVP_BlobRequestHttp request;
	struct EVP_BlobLocalStore store;
	/* The io callback answers ERROR at this call (0: never). */
	unsigned fail_at;
	unsigned calls;
	size_t moved;
	uint32_t hash;
};

static void forget(struct operation *op)
{
	free(op->url);
	free(op);
}

static void on_done(EVP_BLOB_CALLBACK_REASON reason, const void *result,
		    void *user)
{
	struct operation *op = user;
	const struct EVP_BlobResultHttp *r = result;
	char text[192];
	int n;
	if (r != NULL)
		n = snprintf(text, sizeof(text),
			     "reason=%d result=%d http=%u error=%d ", (int)reason,
			     (int)r->result, r->http_status, r->error);
	else
		n = snprintf(text, sizeof(text), "reason=%d ", (int)reason);
	snprintf(text + n, sizeof(text) - n, "len=%zu fnv=%u calls=%u",
		 op->moved, (unsigned)op->hash, op->calls);
	fprintf(stderr, "%s: %s done: %s\n", NAME, op->topic, text);
	send_text_state(op->h, op->topic, text);
	forget(op);
}

/* GET: a chunk arrived. */
static EVP_BLOB_IO_RESULT on_received(void *buf, size_t len, void *user)
{
	struct operation *op = user;
	const unsigned char *bytes = buf;
	if (++op->calls == op->fail_at)
		return EVP_BLOB_IO_RESULT_ERROR;
	for (size_t i = 0; i < len; i++) {
		op->hash ^= bytes[i];
		op->hash *= FNV_PRIME;
	}
	op->moved += len;
	return EVP_BLOB_IO_RESULT_SUCCESS;
}

/* PUT: the next `len` bytes are asked for. */
static EVP_BLOB_IO_RESULT on_wanted(void *buf, size_t len, void *user)
{
	struct operation *op = user;
	unsigned char *bytes = buf;
	if (++op->calls == op->fail_at)
		return EVP_BLOB_IO_RESULT_ERROR;
	for (size_t i = 0; i < len; i++) {
		size_t at = op->moved + i;
		bytes[i] = (unsigned char)(at * 7 % 251);
		op->hash ^= bytes[i];
		op->hash *= FNV_PRIME;
	}
	op->moved += len;
	return EVP_BLOB_IO_RESULT_SUCCESS;
}

static void on_configuration(const char *topic, const void *config,
			     size_t len, void *user)
{
	struct EVP_client *h = user;
	int put = strncmp(topic, "put", 3) == 0;
	int get = strncmp(topic, "get", 3) == 0 || strcmp(topic, "discard") == 0;
	if (!put && !get)
		return;
	struct operation *op = calloc(1, sizeof(*op));
	if (op == NULL)
		return;
	op->h = h;
	op->hash = FNV_OFFSET;
	snprintf(op->topic, sizeof(op->topic), "%s", topic);
	op->fail_at = strstr(topic, "fail") != NULL ? 2 : 0;
	char *text = copy_text(config, len);
	if (text == NULL) {
		free(op);
		return;
	}
	const char *url = text;
	if (put) {
		char *end;
		op->store.blob_len = strtoul(text, &end, 10);
		url = end + strspn(end, " ");
	}
	op->url = copy_text(url, strlen(url));
	free(text);
	if (op->url == NULL) {
		free(op);
		return;
	}
	op->request.url = op->url;
	op->store.filename = NULL;
	if (put)
		op->store.io_cb = on_wanted;
	else if (strcmp(topic, "discard") != 0)
		op->store.io_cb = on_received;
	EVP_RESULT r = EVP_blobOperation(h, EVP_BLOB_TYPE_HTTP,
					 put ? EVP_BLOB_OP_PUT : EVP_BLOB_OP_GET,
					 &op->request, &op->store, on_done, op);
	if (r != EVP_OK) {
		send_text_state(h, op->topic, result_name(r));
		forget(op);
	}
}

int main(void)
{
	struct EVP_client *h = start(NAME);
	EVP_setConfigurationCallback(h, on_configuration, h);
	return serve_until_exit(NAME, h);
}
