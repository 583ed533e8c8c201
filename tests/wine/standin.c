/* A stand-in for python.exe, py.exe and schtasks.exe in the .bat tests under Wine: it
 * records how it was started and exits with a chosen code, so the launchers' plumbing runs
 * under a real cmd.exe without a Windows Python.
 *
 * Appends to the file named by STANDIN_RECORD (UTF-8, one "key=value" per line, a block per
 * start ending with "end"): exe, cwd, every argument, the console code page and the
 * environment variables the launchers set. With "/XML <file>" among the arguments (schtasks)
 * the file is copied to STANDIN_RECORD.xml. Prints a line to stdout (with non-ASCII text)
 * and one to stderr, then exits with STANDIN_EXIT (default 0).
 *
 * Build: x86_64-w64-mingw32-gcc -municode -O1 -o python.exe standin.c
 */
#include <windows.h>
#include <stdio.h>
#include <stdlib.h>
#include <wchar.h>

static void put(FILE *f, const char *key, const wchar_t *value) {
    char buf[8192];
    int n = WideCharToMultiByte(CP_UTF8, 0, value, -1, buf, sizeof buf, NULL, NULL);
    fprintf(f, "%s=%s\n", key, n > 0 ? buf : "");
}

static void put_env(FILE *f, const wchar_t *name) {
    wchar_t value[4096];
    DWORD n = GetEnvironmentVariableW(name, value, 4096);
    char key[256];
    WideCharToMultiByte(CP_UTF8, 0, name, -1, key, sizeof key, NULL, NULL);
    char full[300];
    snprintf(full, sizeof full, "env.%s", key);
    put(f, full, n > 0 && n < 4096 ? value : L"<unset>");
}

static void copy_file(const wchar_t *from, const wchar_t *to) {
    FILE *in = _wfopen(from, L"rb"), *out = _wfopen(to, L"wb");
    if (in && out) {
        char buf[4096];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, in)) > 0) fwrite(buf, 1, n, out);
    }
    if (in) fclose(in);
    if (out) fclose(out);
}

int wmain(int argc, wchar_t **argv) {
    wchar_t record[4096], text[4096];
    if (GetEnvironmentVariableW(L"STANDIN_RECORD", record, 4096)) {
        FILE *f = _wfopen(record, L"ab");
        if (f) {
            GetModuleFileNameW(NULL, text, 4096);
            put(f, "exe", text);
            GetCurrentDirectoryW(4096, text);
            put(f, "cwd", text);
            for (int i = 1; i < argc; i++) put(f, "arg", argv[i]);
            fprintf(f, "codepage=%u\n", GetConsoleOutputCP());
            put_env(f, L"PYTHONUNBUFFERED");
            put_env(f, L"PYTHONUTF8");
            put_env(f, L"SO8T_STAMP_LINES");
            fprintf(f, "end\n");
            fclose(f);
        }
        for (int i = 1; i + 1 < argc; i++) {
            if (_wcsicmp(argv[i], L"/XML") == 0) {
                swprintf(text, 4096, L"%ls.xml", record);
                copy_file(argv[i + 1], text);
            }
        }
    }
    /* UTF-8 bytes of "stand-in out: 学習" and an error line. */
    fputs("stand-in out: \xe5\xad\xa6\xe7\xbf\x92\n", stdout);
    fflush(stdout);
    fputs("stand-in err\n", stderr);
    int code = GetEnvironmentVariableW(L"STANDIN_EXIT", text, 64) ? _wtoi(text) : 0;
    return code;
}
