/*
 * SPDX-License-Identifier: Apache-2.0
 *
 * workspace-write: the configuration `note` = text is written to the file
 * `note.txt` in the instance's workspace, then reported as the state
 * `written` = text; if the file cannot be written, the state `written` is
 * "error: <strerror>". workspace-read, deployed later under the same
 * instance name, reads the file back.
 */

#include <errno.h>

#include "test-module.h"

static const char NAME[] = "workspace-write";

/* Writes `len` bytes to <workspace>/note.txt; 0 or an errno. */
static int write_note(const char *workspace, const char *text, size_t len)
{
	char path[4096];
	snprintf(path, sizeof(path), "%s/note.txt", workspace);
	FILE *f = fopen(path, "w");
	if (f == NULL)
		return errno;
	size_t written = fwrite(text, 1, len, f);
	int failed = written != len ? errno : 0;
	if (fclose(f) != 0 && failed == 0)
		failed = errno;
	return failed;
}

static void on_configuration(const char *topic, const void *config,
			     size_t len, void *user)
{
	struct EVP_client *h = user;
	if (strcmp(topic, "note") != 0)
		return;
	const char *workspace =
		EVP_getWorkspaceDirectory(h, EVP_WORKSPACE_TYPE_DEFAULT);
	char *state = copy_text(config, len);
	if (state == NULL)
		return;
	int failed = write_note(workspace, state, len);
	if (failed != 0) {
		free(state);
		state = malloc(128);
		if (state == NULL)
			return;
		len = snprintf(state, 128, "error: %s", strerror(failed));
	}
	fprintf(stderr, "%s: %s/note.txt: %s\n", NAME, workspace, state);
	if (EVP_sendState(h, "written", state, len, free_when_sent, state) !=
	    EVP_OK)
		free(state);
}

int main(void)
{
	struct EVP_client *h = start(NAME);
	EVP_setConfigurationCallback(h, on_configuration, h);
	return serve_until_exit(NAME, h);
}
