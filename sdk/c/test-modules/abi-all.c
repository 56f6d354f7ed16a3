/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * abi-all: references every function of evp/sdk.h, so that its imports are
 * the whole SDK and the ABI test checks every declaration of the header
 * against the agent's import table. The calls sit behind a flag that is
 * never set: run, the module only logs its start line and returns.
 */

#include "test-module.h"

static const char NAME[] = "abi-all";

/* Never set; volatile, so the compiler keeps the calls it guards. */
static volatile int never;

static void on_config(const char *t, const void *c, size_t n, void *u)
{
	(void)t, (void)c, (void)n, (void)u;
}
static void on_state(EVP_STATE_CALLBACK_REASON r, void *u) { (void)r, (void)u; }
static void on_message_sent(EVP_MESSAGE_SENT_CALLBACK_REASON r, void *u)
{
	(void)r, (void)u;
}
static void on_message(const char *t, const void *p, size_t n, void *u)
{
	(void)t, (void)p, (void)n, (void)u;
}
static void on_telemetry(EVP_TELEMETRY_CALLBACK_REASON r, void *u)
{
	(void)r, (void)u;
}
static void on_command(EVP_RPC_ID id, const char *m, const char *p, void *u)
{
	(void)id, (void)m, (void)p, (void)u;
}
static void on_answered(EVP_RPC_RESPONSE_CALLBACK_REASON r, void *u)
{
	(void)r, (void)u;
}
static void on_blob(EVP_BLOB_CALLBACK_REASON r, const void *res, void *u)
{
	(void)r, (void)res, (void)u;
}
static EVP_BLOB_IO_RESULT on_chunk(void *buf, size_t n, void *u)
{
	(void)buf, (void)n, (void)u;
	return EVP_BLOB_IO_RESULT_SUCCESS;
}
static void on_read(EVP_STREAM_PEER_ID id, const void *b, size_t n, void *u)
{
	(void)id, (void)b, (void)n, (void)u;
}

static void call_everything(void)
{
	struct EVP_client *h = EVP_initialize();
	EVP_getWorkspaceDirectory(h, EVP_WORKSPACE_TYPE_DEFAULT);
	EVP_setConfigurationCallback(h, on_config, NULL);
	EVP_sendState(h, "t", "v", 1, on_state, NULL);
	EVP_sendMessage(h, "t", "v", 1, on_message_sent, NULL);
	struct EVP_telemetry_entry entry = {"k", "1"};
	EVP_sendTelemetry(h, &entry, 1, on_telemetry, NULL);
	EVP_processEvent(h, 0);
	EVP_setMessageCallback(h, on_message, NULL);
	EVP_setRpcCallback(h, on_command, NULL);
	EVP_sendRpcResponse(h, 1, "{}", EVP_RPC_RESPONSE_STATUS_OK, on_answered,
			    NULL);
	struct EVP_BlobRequestHttp http = {"http://x/y"};
	struct EVP_BlobLocalStore store = {NULL, on_chunk, 0};
	EVP_blobOperation(h, EVP_BLOB_TYPE_HTTP, EVP_BLOB_OP_GET, &http, &store,
			  on_blob, NULL);
	struct EVP_BlobRequestHttpExt *ext = EVP_BlobRequestHttpExt_initialize();
	EVP_BlobRequestHttpExt_addHeader(ext, "a", "b");
	EVP_BlobRequestHttpExt_addAzureHeader(ext);
	EVP_BlobRequestHttpExt_setUrl(ext, "http://x/y");
	EVP_BlobRequestHttpExt_free(ext);
	EVP_STREAM out, in;
	EVP_streamOutputOpen(h, "out", &out);
	EVP_streamInputOpen(h, "in", on_read, NULL, &in);
	EVP_streamWrite(h, out, "x", 1);
	EVP_streamClose(h, out);
}

int main(void)
{
	printf("%s: started\n", NAME);
	fflush(stdout);
	if (never)
		call_everything();
	return 0;
}
