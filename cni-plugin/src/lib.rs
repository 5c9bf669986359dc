//! The CNI plugin and node agent of the mesh.
