"""Self-Instruct long instruction data, the LongAlign way (paper section 3.2, appendix A):
long documents -> an OpenAI-compatible chat model proposes 5 questions of a random task
type -> one question at random -> the model answers it given the document -> one chat
sample. docs/DATA_CONSTRUCTION.md describes the procedure and the files.

Modules, one job each: `language` (English or Chinese), `prompts` (the four task
prompts), `documents` (readers and stable ids), `selection` (token-length window and
upsampling), `parsing` (strict question lists, refusals, near-duplicates), `job` (one
document through the model), `settings` (run settings and the sidecar that guards
resumes), `ledger` (what an output already holds), `runner` (the whole run: resume,
concurrency, records, summary), `report` (the summary for the console).
"""
