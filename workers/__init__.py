"""workers: the compute side of dicom-node (Celery tasks, volume loading, models, SEG/SR encoding).

May import ``dicom_node``; ``dicom_node`` never imports this package.
"""
