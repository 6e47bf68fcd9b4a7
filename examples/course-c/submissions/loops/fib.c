/* Exponential: fine for the small cases, never ends for fib(50). */
long fib(int n) { return n <= 0 ? 0 : n == 1 ? 1 : fib(n - 1) + fib(n - 2); }
