"""Schemathesis hooks for the gateway fuzz run (tests/tests/e2e/gateway.rs).

`no_unexpected_server_error` fails on any 5xx except a 503 that carries
`Retry-After`: that one is the documented backpressure of a read whose
`min_seq` the projection has not reached within the bounded wait.
"""

import schemathesis


@schemathesis.check
def no_unexpected_server_error(ctx, response, case):
    status = response.status_code
    if status >= 500 and not (status == 503 and "retry-after" in {k.lower() for k in response.headers}):
        raise AssertionError(
            f"{case.method} {case.formatted_path} answered {status}: {response.text[:300]}"
        )
