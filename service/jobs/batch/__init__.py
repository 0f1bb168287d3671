"""Batch identification on the job system: a job of kind ``identify_batch`` identifies many
photos (the entries of a ZIP archive, stored images, or URLs on the fetch allowlist) chunk by
chunk, like ``POST /identify`` one by one, and keeps each photo's answer on the job. Its last
chunk POSTs the result to the job's ``callback_url``, signed with the key's own secret
(``service.outbound.callbacks``); a job that fails or is cancelled reports that too.

Several partners share one service, so a job belongs to the key that made it (another
integration key never sees it), and each key is held to quotas: jobs queued or running, photos
waiting in them, and bytes of archive photos held in the store. The worker takes chunks key by
key in turn (``service.jobs.queue.lease_next``), so one partner's thousand photos do not starve
another's ten.

The modules, in the order a batch goes through them:

- ``submit``: a batch's photos (an archive read and kept, stored images, URLs), the key's
  quotas, and queuing the job.
- ``chunks``: the worker's handler, identifying a chunk's photos; its last phase closes the job.
- ``results``: each photo's answer as JSON, as ``results.csv``, and as the callback carries it.
- ``closing``: closing a job that ended (its archive's photos removed, its photo URLs' query
  strings forgotten, its end reported to the callback), and archive photos no job holds.
"""
