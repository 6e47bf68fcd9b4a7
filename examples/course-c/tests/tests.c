/* The course's tests and a tiny runner: each test in a forked child with an alarm, so a
 * test that crashes or loops fails alone; results go to the JUnit XML file in argv[1]. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

long fib(int n);

#define CHECK(cond)                                                      \
    do {                                                                 \
        if (!(cond)) {                                                   \
            fprintf(stderr, "%s:%d: check failed: %s", __FILE__, __LINE__, #cond); \
            exit(1);                                                     \
        }                                                                \
    } while (0)

static void fib_small(void) { CHECK(fib(0) == 0); CHECK(fib(1) == 1); CHECK(fib(10) == 55); }
static void fib_large(void) { CHECK(fib(50) == 12586269025L); }
static void fib_negative(void) { CHECK(fib(-3) == 0); }

static const struct { const char *name; void (*run)(void); } TESTS[] = {
    {"fib_small", fib_small}, {"fib_large", fib_large}, {"fib_negative", fib_negative},
};

static void xml_text(FILE *out, const char *s) {
    for (; *s; s++) {
        switch (*s) {
        case '<': fputs("&lt;", out); break;
        case '>': fputs("&gt;", out); break;
        case '&': fputs("&amp;", out); break;
        case '"': fputs("&quot;", out); break;
        default: if ((unsigned char)*s >= 0x20 || *s == '\n') fputc(*s, out);
        }
    }
}

/* Runs one test in a child; "" when it passed, else why it failed (in `why`). */
static void run_one(void (*run)(void), unsigned seconds, char *why, size_t size) {
    int pipefd[2];
    why[0] = '\0';
    if (pipe(pipefd) != 0) { snprintf(why, size, "pipe failed"); return; }
    fflush(NULL); /* or the child would write the parent's buffered output again */
    pid_t pid = fork();
    if (pid == 0) {
        close(pipefd[0]);
        dup2(pipefd[1], 2);
        alarm(seconds);
        run();
        exit(0);
    }
    close(pipefd[1]);
    ssize_t n = read(pipefd[0], why, size - 1);
    why[n > 0 ? n : 0] = '\0';
    close(pipefd[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    if (WIFSIGNALED(status) && WTERMSIG(status) == SIGALRM)
        snprintf(why, size, "timed out after %u.0s", seconds);
    else if (WIFSIGNALED(status))
        snprintf(why, size, "crashed: %s", strsignal(WTERMSIG(status)));
    else if (WEXITSTATUS(status) != 0 && why[0] == '\0')
        snprintf(why, size, "exited with code %d", WEXITSTATUS(status));
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s JUNIT.xml\n", argv[0]); return 2; }
    const char *env = getenv("GRADER_TEST_SECONDS");
    unsigned seconds = env && atoi(env) > 0 ? (unsigned)atoi(env) : 2;
    FILE *out = fopen(argv[1], "w");
    if (!out) { perror(argv[1]); return 2; }
    size_t count = sizeof TESTS / sizeof TESTS[0];
    int failed = 0;
    fprintf(out, "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<testsuites><testsuite name=\"fib\" tests=\"%zu\">\n", count);
    for (size_t i = 0; i < count; i++) {
        char why[1024];
        run_one(TESTS[i].run, seconds, why, sizeof why);
        fprintf(out, "<testcase classname=\"fib\" name=\"%s\">", TESTS[i].name);
        if (why[0]) {
            failed++;
            fputs("<failure message=\"", out);
            xml_text(out, why);
            fputs("\"/>", out);
        }
        fputs("</testcase>\n", out);
    }
    fputs("</testsuite></testsuites>\n", out);
    fclose(out);
    return failed ? 1 : 0;
}
