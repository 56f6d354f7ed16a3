/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * workspace-read: at start, reads the file `note.txt` of the instance's
 * workspace (as workspace-write left it under the same instance name) and
 * reports the state `read` = its contents, or "error: <strerror>" when it
 * cannot be read; then serves until the agent asks it to exit.
 */

#include <errno.h>

#include "test-module.h"

static const char NAME[] = "workspace-read";
/* More than any note a test writes; a longer one is cut. */
static const size_t MAX_NOTE = 64 * 1024;

/* The contents of <workspace>/note.txt in `buf` (`*len` bytes); 0 or an
 * errno. */
static int read_note(const char *workspace, char *buf, size_t *len)
{
	char path[4096];
	snprintf(path, sizeof(path), "%s/note.txt", workspace);
	FILE *f = fopen(path, "r");
	if (f == NULL)
		return errno;
	*len = fread(buf, 1, MAX_NOTE, f);
	int failed = ferror(f) ? errno : 0;
	fclose(f);
	return failed;
}

int main(void)
{
	struct EVP_client *h = start(NAME);
	const char *workspace =
		EVP_getWorkspaceDirectory(h, EVP_WORKSPACE_TYPE_DEFAULT);
	char *state = malloc(MAX_NOTE);
	if (state == NULL)
		return 1;
	size_t len = 0;
	int failed = read_note(workspace, state, &len);
	if (failed != 0)
		len = snprintf(state, MAX_NOTE, "error: %s", strerror(failed));
	fprintf(stderr, "%s: %s/note.txt: %zu bytes\n", NAME, workspace, len);
	if (EVP_sendState(h, "read", state, len, free_when_sent, state) != EVP_OK)
		free(state);
	return serve_until_exit(NAME, h);
}
