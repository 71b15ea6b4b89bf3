"""Copy a legacy v1 `inference_runs` table into v2 `raw_calls` and batch groups.

    python scripts/migrate_v1_to_v2.py [--source URL] [--target URL] [--source-name NAME]
                                       [--chunk-size N] [--no-progress]

The source is LEGACY_DATABASE_URL (or --source), SQLite or PostgreSQL, opened read-only;
the target is DATABASE_URL (or --target), upgraded to the newest schema first. Each legacy
row becomes one successful chat call with its original time, tokens, latency and
metadata, and each `batch_id` a batch group with members in original order. Rows are
streamed in chunks, one transaction per chunk; running it again (or after a crash)
imports only what is missing. Same as `study-query-llm db import-v1`. See
`study_query_llm.services.legacy_import` for the mapping.
"""

from __future__ import annotations

import sys

from study_query_llm.legacy_commands import import_main

if __name__ == "__main__":
    sys.exit(import_main())
