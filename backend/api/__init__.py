"""Remote management of the volume catalogue: HTTP/JSON with bearer-token auth.

    local.py    where a data directory's server publishes its API (DATA/api.sock, DATA/api-token)
    errors.py   the API's own errors and how an error answer becomes a VolumeError again
    imports.py  importing an image into a new volume on a background thread, with progress
    app.py      the FastAPI application over one VolumeService (routes, auth, error shape)
    server.py   ApiServer: uvicorn on a background thread inside ``nbs serve``
    client.py   RemoteVolumes (LocalVolumes' operations over HTTP) and client_for()

Importing this package imports none of them: the CLI pays for httpx only when it talks to a
server, and for FastAPI/uvicorn only when it serves.
"""
