"""HTTP route modules. Each module here that defines ``router`` (a FastAPI APIRouter) is mounted
by :func:`dicom_node.api.app.create_app`; an optional ``setup(app)`` runs first."""
