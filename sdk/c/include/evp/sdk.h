/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * The EVP module SDK, as evp-agent serves it: the C API a module is built
 * against, source compatible with the EVP agent's `evp/sdk.h` (its types,
 * enum values and function signatures), so a module written for EVP builds
 * with this header unchanged.
 *
 * Built for WebAssembly (`clang --target=wasm32-wasi`), every function is an
 * import from the module `env` under its own C name, which is what the agent's
 * WASM runtime provides. Built natively, the functions are ordinary external
 * symbols for a native SDK library to provide.
 *
 * Every request is asynchronous: it is queued, and its callback runs later,
 * from inside EVP_processEvent, on the thread that calls it.
 */

#ifndef EVP_SDK_H
#define EVP_SDK_H

#include <stddef.h>
#include <stdint.h>

#if defined(__cplusplus)
extern "C" {
#endif

/* Each function is the import `env.<its name>` in a WASM module. */
#if defined(__wasm__)
#define EVP_IMPORT(name) \
	__attribute__((import_module("env"), import_name(#name)))
#else
#define EVP_IMPORT(name)
#endif

/* Compile-time checks of sizes and layouts. Before C11 and C++11, an array
 * of negative size makes a false condition a compile error all the same. */
#if defined(__cplusplus) && __cplusplus >= 201103L
#define EVP_STATIC_ASSERT(cond) static_assert(cond, #cond)
#elif !defined(__cplusplus) && defined(__STDC_VERSION__) && \
	__STDC_VERSION__ >= 201112L
#define EVP_STATIC_ASSERT(cond) _Static_assert(cond, #cond)
#else
#define EVP_STATIC_ASSERT(cond) \
	extern int evp_static_assert_[(cond) ? 1 : -1]
#endif

/*
 * Every enum has a last value of 0x3fffffff so that it has the size of an
 * int whatever the compiler: the values cross the WASM boundary as i32.
 */
#define EVP_ENUM_INT_SIZE 0x3fffffff

/* ---- Types ------------------------------------------------------------ */

/* The agent's handle for this instance; opaque to the module. */
struct EVP_client;

/* Identifies one direct command (RPC) until it is answered. */
typedef uint64_t EVP_RPC_ID;

/* An open stream. */
typedef int EVP_STREAM;

/* Who sent the data of a stream read. */
typedef unsigned long EVP_STREAM_PEER_ID;

/* What an SDK call returns. */
typedef enum {
	EVP_OK = 0,               /* done, or one event was processed */
	EVP_SHOULDEXIT = 1,       /* the agent asked the instance to exit */
	EVP_TIMEDOUT = 2,         /* no event came within the timeout */
	EVP_ERROR = 3,            /* something else went wrong */
	EVP_INVAL = 4,            /* a parameter is not valid */
	EVP_NOMEM = 5,            /* out of memory */
	EVP_TOOBIG = 6,           /* the data can never fit */
	EVP_AGAIN = 7,            /* no room now: process events and retry */
	EVP_AGENT_PROTOCOL_ERROR = 8, /* the agent's answer made no sense */
	EVP_EXIST = 9,            /* already there (an open stream) */
	EVP_FAULT = 10,           /* a pointer outside the module's memory */
	EVP_DENIED = 11,          /* refused, e.g. too many at once */
	EVP_NOTSUP = 12,          /* not supported by this agent */
	EVP_RESULT_INT_SIZE = EVP_ENUM_INT_SIZE
} EVP_RESULT;

/* Why a state callback runs. */
typedef enum {
	EVP_STATE_CALLBACK_REASON_SENT = 0,        /* the agent took it */
	EVP_STATE_CALLBACK_REASON_OVERWRITTEN = 1, /* a newer state of the topic replaced it */
	EVP_STATE_CALLBACK_REASON_EXIT = 2,        /* cancelled: the instance is exiting */
	EVP_STATE_CALLBACK_REASON_DENIED = 3,      /* refused by the agent */
	EVP_STATE_CALLBACK_REASON_INT_SIZE = EVP_ENUM_INT_SIZE
} EVP_STATE_CALLBACK_REASON;

/* Why a message-sent callback runs. */
typedef enum {
	EVP_MESSAGE_SENT_CALLBACK_REASON_SENT = 0,  /* delivered to at least one subscriber */
	EVP_MESSAGE_SENT_CALLBACK_REASON_ERROR = 1, /* delivered to nobody */
	EVP_MESSAGE_SENT_CALLBACK_REASON_EXIT = 2,  /* cancelled: the instance is exiting */
	EVP_MESSAGE_SENT_CALLBACK_REASON_INT_SIZE = EVP_ENUM_INT_SIZE
} EVP_MESSAGE_SENT_CALLBACK_REASON;

/* Why a telemetry callback runs. */
typedef enum {
	EVP_TELEMETRY_CALLBACK_REASON_SENT = 0,   /* the agent took it */
	EVP_TELEMETRY_CALLBACK_REASON_ERROR = 1,  /* it could not be sent */
	EVP_TELEMETRY_CALLBACK_REASON_EXIT = 2,   /* cancelled: the instance is exiting */
	EVP_TELEMETRY_CALLBACK_REASON_DENIED = 3, /* refused by the agent */
	EVP_TELEMETRY_CALLBACK_REASON_INT_SIZE = EVP_ENUM_INT_SIZE
} EVP_TELEMETRY_CALLBACK_REASON;

/* Why an RPC-response callback runs. */
typedef enum {
	EVP_RPC_RESPONSE_CALLBACK_REASON_SENT = 0,   /* the agent took it */
	EVP_RPC_RESPONSE_CALLBACK_REASON_ERROR = 1,  /* it could not be sent */
	EVP_RPC_RESPONSE_CALLBACK_REASON_EXIT = 2,   /* cancelled: the instance is exiting */
	EVP_RPC_RESPONSE_CALLBACK_REASON_DENIED = 3, /* refused by the agent */
	EVP_RPC_RESPONSE_CALLBACK_REASON_INT_SIZE = EVP_ENUM_INT_SIZE
} EVP_RPC_RESPONSE_CALLBACK_REASON;

/* How a direct command ended, as the module answers it. */
typedef enum {
	EVP_RPC_RESPONSE_STATUS_OK = 0,
	EVP_RPC_RESPONSE_STATUS_METHOD_NOT_FOUND = 1, /* the hub is told so; the response is not used */
	EVP_RPC_RESPONSE_STATUS_ERROR = 2,
	EVP_RPC_RESPONSE_STATUS_MAX_ = 3, /* one past the last status (the agent checks against it) */
	EVP_RPC_RESPONSE_STATUS_INT_SIZE = EVP_ENUM_INT_SIZE
} EVP_RPC_RESPONSE_STATUS;

/* Which workspace directory. */
typedef enum {
	EVP_WORKSPACE_TYPE_DEFAULT = 0,
	EVP_WORKSPACE_TYPE_INT_SIZE = EVP_ENUM_INT_SIZE
} EVP_WORKSPACE_TYPE;

/* Where a blob is, and so which request struct describes it. */
typedef enum {
	EVP_BLOB_TYPE_AZURE_BLOB = 0, /* struct EVP_BlobRequestAzureBlob */
	EVP_BLOB_TYPE_EVP = 1,        /* struct EVP_BlobRequestEvp (deprecated: use EVP_EXT) */
	EVP_BLOB_TYPE_HTTP = 2,       /* struct EVP_BlobRequestHttp */
	EVP_BLOB_TYPE_EVP_EXT = 3,    /* struct EVP_BlobRequestEvpExt */
	EVP_BLOB_TYPE_HTTP_EXT = 4,   /* struct EVP_BlobRequestHttpExt */
	EVP_BLOB_TYPE_INT_SIZE = EVP_ENUM_INT_SIZE
} EVP_BLOB_TYPE;

/* What a blob operation does. */
typedef enum {
	EVP_BLOB_OP_GET = 0, /* download */
	EVP_BLOB_OP_PUT = 1, /* upload */
	EVP_BLOB_OPERATION_INT_SIZE = EVP_ENUM_INT_SIZE
} EVP_BLOB_OPERATION;

/* What a blob I/O callback answers for its chunk. */
typedef enum {
	EVP_BLOB_IO_RESULT_SUCCESS = 0,
	EVP_BLOB_IO_RESULT_ERROR = 1, /* stops the transfer */
	EVP_BLOB_IO_RESULT_INT_SIZE = EVP_ENUM_INT_SIZE
} EVP_BLOB_IO_RESULT;

/* How a blob operation ended. */
typedef enum {
	EVP_BLOB_RESULT_SUCCESS = 0,
	EVP_BLOB_RESULT_ERROR = 1,      /* see `error` (an errno) */
	EVP_BLOB_RESULT_ERROR_HTTP = 2, /* see `http_status` */
	EVP_BLOB_RESULT_INT_SIZE = EVP_ENUM_INT_SIZE
} EVP_BLOB_RESULT;

/* Why a blob callback runs. */
typedef enum {
	EVP_BLOB_CALLBACK_REASON_DONE = 0,   /* finished, well or not: see the result */
	EVP_BLOB_CALLBACK_REASON_EXIT = 1,   /* cancelled: the instance is exiting */
	EVP_BLOB_CALLBACK_REASON_DENIED = 2, /* refused by the agent */
	EVP_BLOB_CALLBACK_REASON_INT_SIZE = EVP_ENUM_INT_SIZE
} EVP_BLOB_CALLBACK_REASON;

EVP_STATIC_ASSERT(sizeof(EVP_RESULT) == sizeof(int));
EVP_STATIC_ASSERT(sizeof(EVP_STATE_CALLBACK_REASON) == sizeof(int));
EVP_STATIC_ASSERT(sizeof(EVP_MESSAGE_SENT_CALLBACK_REASON) == sizeof(int));
EVP_STATIC_ASSERT(sizeof(EVP_TELEMETRY_CALLBACK_REASON) == sizeof(int));
EVP_STATIC_ASSERT(sizeof(EVP_RPC_RESPONSE_CALLBACK_REASON) == sizeof(int));
EVP_STATIC_ASSERT(sizeof(EVP_RPC_RESPONSE_STATUS) == sizeof(int));
EVP_STATIC_ASSERT(sizeof(EVP_WORKSPACE_TYPE) == sizeof(int));
EVP_STATIC_ASSERT(sizeof(EVP_BLOB_TYPE) == sizeof(int));
EVP_STATIC_ASSERT(sizeof(EVP_BLOB_OPERATION) == sizeof(int));
EVP_STATIC_ASSERT(sizeof(EVP_BLOB_IO_RESULT) == sizeof(int));
EVP_STATIC_ASSERT(sizeof(EVP_BLOB_RESULT) == sizeof(int));
EVP_STATIC_ASSERT(sizeof(EVP_BLOB_CALLBACK_REASON) == sizeof(int));

/* ---- Callbacks ---------------------------------------------------------- */
/*
 * Every pointer a callback receives is valid only until it returns: copy what
 * must outlive it. `userData` is what the module passed with the request.
 */

/* A configuration of `topic`: `configlen` bytes, not NUL-terminated. */
typedef void (*EVP_CONFIGURATION_CALLBACK)(const char *topic,
					   const void *config,
					   size_t configlen, void *userData);

/* The outcome of EVP_sendState. */
typedef void (*EVP_STATE_CALLBACK)(EVP_STATE_CALLBACK_REASON reason,
				   void *userData);

/* The outcome of EVP_sendMessage. */
typedef void (*EVP_MESSAGE_SENT_CALLBACK)(
	EVP_MESSAGE_SENT_CALLBACK_REASON reason, void *userData);

/* A message received; `topic` is this instance's subscribe alias. */
typedef void (*EVP_MESSAGE_RECEIVED_CALLBACK)(const char *topic,
					      const void *msgPayload,
					      size_t msgPayloadLen,
					      void *userData);

/* The outcome of EVP_sendTelemetry. */
typedef void (*EVP_TELEMETRY_CALLBACK)(EVP_TELEMETRY_CALLBACK_REASON reason,
				       void *userData);

/* A direct command: answer it exactly once, with EVP_sendRpcResponse(id). */
typedef void (*EVP_RPC_REQUEST_CALLBACK)(EVP_RPC_ID id, const char *methodName,
					 const char *params, void *userData);

/* The outcome of EVP_sendRpcResponse. */
typedef void (*EVP_RPC_RESPONSE_CALLBACK)(
	EVP_RPC_RESPONSE_CALLBACK_REASON reason, void *userData);

/*
 * The outcome of EVP_blobOperation. `result` points to the result struct of
 * the request's type (struct EVP_BlobResult...); NULL when reason is EXIT.
 */
typedef void (*EVP_BLOB_CALLBACK)(EVP_BLOB_CALLBACK_REASON reason,
				  const void *result, void *userData);

/*
 * One chunk of a memory blob operation: GET hands a received chunk to the
 * module, PUT asks the module to fill `buf` with the next `buflen` bytes.
 */
typedef EVP_BLOB_IO_RESULT (*EVP_BLOB_IO_CALLBACK)(void *buf, size_t buflen,
						   void *userData);

/* Data read on an input stream, from peer `id`. */
typedef void (*EVP_STREAM_READ_CALLBACK)(EVP_STREAM_PEER_ID id,
					 const void *buf, size_t n,
					 void *userData);

/* ---- Structures ----------------------------------------------------------- */

/* One telemetry entry: a key and its value as JSON text. */
struct EVP_telemetry_entry {
	const char *key;
	const char *value;
};

/* Where the data of a blob operation comes from or goes to. */
struct EVP_BlobLocalStore {
	/* An absolute path in the workspace, or NULL for a memory operation. */
	const char *filename;
	/* The chunk callback of a memory operation (NULL on GET: discard). */
	EVP_BLOB_IO_CALLBACK io_cb;
	/* The size to PUT, for a memory operation. */
	size_t blob_len;
};

/* A blob in Azure storage: `url` is its SAS URL. */
struct EVP_BlobRequestAzureBlob {
	const char *url;
};

/* A blob in the EVP storage provider (deprecated: use EvpExt). */
struct EVP_BlobRequestEvp {
	const char *remote_name;
};

/* A blob in the EVP storage provider; NULL storage_name: the default one. */
struct EVP_BlobRequestEvpExt {
	const char *remote_name;
	const char *storage_name;
};

/* A blob on an ordinary HTTP(S) server. */
struct EVP_BlobRequestHttp {
	const char *url;
};

/* A blob on an HTTP(S) server, with extra headers: build it with the
 * EVP_BlobRequestHttpExt_* functions, never by hand. */
struct EVP_BlobRequestHttpExt;

/* How a blob operation of each type ended. */
struct EVP_BlobResultAzureBlob {
	EVP_BLOB_RESULT result;
	unsigned int http_status;
	int error; /* an errno, for EVP_BLOB_RESULT_ERROR */
};

struct EVP_BlobResultEvp {
	EVP_BLOB_RESULT result;
	unsigned int http_status;
	int error; /* an errno, for EVP_BLOB_RESULT_ERROR */
};

struct EVP_BlobResultHttp {
	EVP_BLOB_RESULT result;
	unsigned int http_status;
	int error; /* an errno, for EVP_BLOB_RESULT_ERROR */
};

struct EVP_BlobResultHttpExt {
	EVP_BLOB_RESULT result;
	unsigned int http_status;
	int error; /* an errno, for EVP_BLOB_RESULT_ERROR */
};

#if defined(__wasm32__)
/* The layouts the agent's WASM runtime reads and writes in module memory. */
EVP_STATIC_ASSERT(sizeof(struct EVP_telemetry_entry) == 8);
EVP_STATIC_ASSERT(offsetof(struct EVP_telemetry_entry, value) == 4);
EVP_STATIC_ASSERT(sizeof(struct EVP_BlobLocalStore) == 12);
EVP_STATIC_ASSERT(offsetof(struct EVP_BlobLocalStore, io_cb) == 4);
EVP_STATIC_ASSERT(offsetof(struct EVP_BlobLocalStore, blob_len) == 8);
EVP_STATIC_ASSERT(sizeof(struct EVP_BlobRequestEvpExt) == 8);
EVP_STATIC_ASSERT(sizeof(struct EVP_BlobResultHttp) == 12);
EVP_STATIC_ASSERT(offsetof(struct EVP_BlobResultHttp, error) == 8);
EVP_STATIC_ASSERT(sizeof(EVP_STREAM_PEER_ID) == 4);
#endif

/* ---- Functions ------------------------------------------------------------ */
/*
 * Every function taking `h` answers EVP_INVAL when `h` is not the handle
 * EVP_initialize returned. A request made after the agent asked the instance
 * to exit gets its callback with the EXIT reason.
 */

/* Connects the instance to the agent; call it once, from the main thread.
 * Returns the handle every other call takes. */
EVP_IMPORT(EVP_initialize)
struct EVP_client *EVP_initialize(void);

/* The absolute path of the instance's persistent workspace directory: it
 * survives restarts of the instance and is removed once the instance leaves
 * the deployment. Only EVP_WORKSPACE_TYPE_DEFAULT exists. */
EVP_IMPORT(EVP_getWorkspaceDirectory)
const char *EVP_getWorkspaceDirectory(struct EVP_client *h,
				      EVP_WORKSPACE_TYPE type);

/* Registers the configuration callback; every configuration the agent holds
 * is delivered again after it. A second call gives EVP_ERROR. */
EVP_IMPORT(EVP_setConfigurationCallback)
EVP_RESULT EVP_setConfigurationCallback(struct EVP_client *h,
					EVP_CONFIGURATION_CALLBACK cb,
					void *userData);

/* Reports the state `topic` (the hub keeps the latest per topic). Keep the
 * buffers alive until the callback: a native agent may not copy them (WASM
 * and remote modules' data is copied at the call). EVP_TOOBIG when it can
 * never fit a hub message. */
EVP_IMPORT(EVP_sendState)
EVP_RESULT EVP_sendState(struct EVP_client *h, const char *topic,
			 const void *state, size_t statelen,
			 EVP_STATE_CALLBACK cb, void *userData);

/* Sends a message on the publish alias `topic` to the instances subscribed to
 * its topic (local delivery only). The callback says SENT when at least one
 * subscriber got it, ERROR otherwise. */
EVP_IMPORT(EVP_sendMessage)
EVP_RESULT EVP_sendMessage(struct EVP_client *h, const char *topic,
			   const void *msgPayload, size_t msgPayloadLen,
			   EVP_MESSAGE_SENT_CALLBACK cb, void *userData);

/* Sends `nentries` telemetry entries to the hub as one message. EVP_TOOBIG
 * when they can never fit one hub message (or there are more than 1000). */
EVP_IMPORT(EVP_sendTelemetry)
EVP_RESULT EVP_sendTelemetry(struct EVP_client *h,
			     const struct EVP_telemetry_entry *entries,
			     size_t nentries, EVP_TELEMETRY_CALLBACK cb,
			     void *userData);

/* Runs the callback of one queued event. timeout_ms: 0 polls, -1 waits for
 * ever. EVP_OK when a callback ran; EVP_TIMEDOUT when nothing came;
 * EVP_SHOULDEXIT once the agent asked the instance to exit and no event is
 * left: the module should then return from main. */
EVP_IMPORT(EVP_processEvent)
EVP_RESULT EVP_processEvent(struct EVP_client *h, int timeout_ms);

/* Registers the callback of messages received on the subscribe aliases.
 * Call it at most once. */
EVP_IMPORT(EVP_setMessageCallback)
EVP_RESULT EVP_setMessageCallback(struct EVP_client *h,
				  EVP_MESSAGE_RECEIVED_CALLBACK cb,
				  void *userData);

/* Registers the callback of direct commands; each command must be answered
 * exactly once. A NULL cb, or a second call, gives EVP_INVAL on WASM. */
EVP_IMPORT(EVP_setRpcCallback)
EVP_RESULT EVP_setRpcCallback(struct EVP_client *h, EVP_RPC_REQUEST_CALLBACK cb,
			      void *userData);

/* Answers the direct command `id` with `response` (JSON text) and `status`.
 * With METHOD_NOT_FOUND the hub gets "Unknown method" and the response is
 * not used. EVP_TOOBIG when the answer can never fit a hub message. */
EVP_IMPORT(EVP_sendRpcResponse)
EVP_RESULT EVP_sendRpcResponse(struct EVP_client *h, EVP_RPC_ID id,
			       const char *response,
			       EVP_RPC_RESPONSE_STATUS status,
			       EVP_RPC_RESPONSE_CALLBACK cb, void *userData);

/* Starts an HTTP(S) transfer of the blob `request` describes (a struct of
 * `type`) to or from `localStore`; `cb` (not NULL) gets the result. EVP and
 * EVP_EXT GET give EVP_NOTSUP; more than 10 at once give EVP_DENIED. Memory
 * chunks go through localStore->io_cb, inside EVP_processEvent: keep calling
 * it while a transfer runs. */
EVP_IMPORT(EVP_blobOperation)
EVP_RESULT EVP_blobOperation(struct EVP_client *h, EVP_BLOB_TYPE type,
			     EVP_BLOB_OPERATION op, const void *request,
			     struct EVP_BlobLocalStore *localStore,
			     EVP_BLOB_CALLBACK cb, void *userData);

/* A new, empty HTTP_EXT request (no URL, no header); NULL on failure. Free it
 * with EVP_BlobRequestHttpExt_free. */
EVP_IMPORT(EVP_BlobRequestHttpExt_initialize)
struct EVP_BlobRequestHttpExt *EVP_BlobRequestHttpExt_initialize(void);

/* Adds the header "name: value" to the request; EVP_TOOBIG past 100. */
EVP_IMPORT(EVP_BlobRequestHttpExt_addHeader)
EVP_RESULT EVP_BlobRequestHttpExt_addHeader(
	struct EVP_BlobRequestHttpExt *request, const char *name,
	const char *value);

/* Adds "x-ms-blob-type: BlockBlob", which Azure wants on a PUT. */
EVP_IMPORT(EVP_BlobRequestHttpExt_addAzureHeader)
EVP_RESULT EVP_BlobRequestHttpExt_addAzureHeader(
	struct EVP_BlobRequestHttpExt *request);

/* Sets the request's URL (copied; a previous one is freed). */
EVP_IMPORT(EVP_BlobRequestHttpExt_setUrl)
EVP_RESULT EVP_BlobRequestHttpExt_setUrl(struct EVP_BlobRequestHttpExt *request,
					 char *url);

/* Frees the request, its URL and its headers. */
EVP_IMPORT(EVP_BlobRequestHttpExt_free)
void EVP_BlobRequestHttpExt_free(struct EVP_BlobRequestHttpExt *request);

/* Opens the output stream `name` (declared `out` in the deployment) and
 * stores its id in *stream. EVP_INVAL if it is not declared so; EVP_EXIST if
 * it is open already. (Streams are experimental.) */
EVP_IMPORT(EVP_streamOutputOpen)
EVP_RESULT EVP_streamOutputOpen(struct EVP_client *h, const char *name,
				EVP_STREAM *stream);

/* Opens the input stream `name` (declared `in`); data arrives as `cb`
 * events inside EVP_processEvent. Errors as EVP_streamOutputOpen. */
EVP_IMPORT(EVP_streamInputOpen)
EVP_RESULT EVP_streamInputOpen(struct EVP_client *h, const char *name,
			       EVP_STREAM_READ_CALLBACK cb, void *userData,
			       EVP_STREAM *stream);

/* Closes a stream; an output stream is flushed first. */
EVP_IMPORT(EVP_streamClose)
EVP_RESULT EVP_streamClose(struct EVP_client *h, EVP_STREAM stream);

/* Queues `n` bytes on an output stream; sent asynchronously. */
EVP_IMPORT(EVP_streamWrite)
EVP_RESULT EVP_streamWrite(struct EVP_client *h, EVP_STREAM stream,
			   const void *buf, size_t n);

/*
 * EVP_blobGetUploadURL is not declared: it exists only for modules linked into
 * the EVP agent itself, never for WASM or remote modules.
 */

#undef EVP_IMPORT

#if defined(__cplusplus)
} /* extern "C" */
#endif

#endif /* EVP_SDK_H */
