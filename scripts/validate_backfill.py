"""Compare a legacy v1 database with the v2 rows imported from it; exit 1 on any mismatch.

    python scripts/validate_backfill.py [--source URL] [--target URL] [--source-name NAME]
                                        [--sample N] [--seed S] [--full]

Checks row counts, per-batch group sizes, member order, the time range, and a seeded
random sample of rows (every row with --full) field by field: prompt, response,
provider, model, tokens, latency, time, status and metadata. Prints a report; the exit
code is 0 when everything agrees, 1 on any mismatch (the report says which), 2 for a
bad argument or an unusable source. The target is only read. See
`study_query_llm.services.legacy_validate`.
"""

from __future__ import annotations

import sys

from study_query_llm.legacy_commands import validate_main

if __name__ == "__main__":
    sys.exit(validate_main())
