"""A site's data: DICOM index, image loading, EHR tables, the torch dataset."""
