"""Three small real perturbation datasets shipped inside the package (offline, 9.5 MB in total).

See ``DATA_NOTICE.md`` (next to the data files and at the repository root) for provenance and licences.
"""

from __future__ import annotations

from importlib import resources

import anndata as ad
import numpy as np
from scipy import sparse

_FILES = {
    "kang2018": "kang2018_ifnb_pbmc_scgen.h5ad",
    "kang2018_donors": "kang2018_ifnb_pbmc_muscat_counts.h5ad",
    "norman2019": "perturbench_devel_norman19_mcfaline23.h5ad",
}


def _read(name: str) -> ad.AnnData:
    with resources.as_file(resources.files(__package__) / "_data" / _FILES[name]) as path:
        return ad.read_h5ad(path)


def kang2018() -> ad.AnnData:
    """Kang et al. 2018 PBMC, control vs IFN-beta stimulated: the scGen validation split (1,975 cells x 6,998 genes).

    ``X`` is log1p of library-size-normalised expression (float32, as shipped by scGen);
    ``layers["counts"]`` holds the integer UMI counts recovered exactly from ``X``.
    ``obs["condition"]`` is ``control`` (936) / ``stimulated`` (1,039); ``obs["cell_type"]`` has 7 types
    (CD4T 634, FCGR3A+Mono 421, CD14+Mono 321, B 222, NK 141, CD8T 122, Dendritic 114). No donor column.

    Provenance: repository theislab/scgen, ``data/valid.h5ad`` at commit
    ``dd7e178f9b42b9dfef9eb18d0da4b8e3caea4cf7`` (blob ``1c1ac1c7``), also in ``adata.uns["provenance"]``.
    Licence: the scGen repository is GPL-3.0; the data are public (Kang et al., Nat Biotechnol 2018,
    GEO GSE96583).

    Examples
    --------
    >>> adata = perturbdiff_scvi.datasets.kang2018()
    >>> PerturbDiff.setup_anndata(adata, perturbation_key="condition", control_value="control",
    ...                           context_key="cell_type")
    """
    return _read("kang2018")


def kang2018_donors() -> ad.AnnData:
    """Kang et al. 2018 PBMC with donors: muscat's ``example_sce`` (1,556 cells x 1,267 genes).

    Two donors (``obs["donor"]`` 101 / 107) x control / stimulated x 5 cell types, at most 100 cells per
    cluster-sample. The shipped file holds raw UMI counts; this loader keeps them in
    ``layers["counts"]`` and sets ``X`` to ``log1p`` of counts normalised to 10,000 per cell (the input
    PerturbDiff expects). ``layers["logcounts"]`` is scater's log2 normalisation, as shipped.

    Provenance: repository HelenaLC/muscat, ``data/example_sce.rda`` at commit
    ``017b290b414212c357e184d17edcca27f4302ace`` (blob ``ea3c45be``), converted from
    SingleCellExperiment (cluster_id -> cell_type, group_id -> condition).
    Licence: the muscat package is GPL-3; the data are Kang et al. 2018 (GEO GSE96583).

    Examples
    --------
    >>> adata = perturbdiff_scvi.datasets.kang2018_donors()
    >>> PerturbDiff.setup_anndata(adata, perturbation_key="condition", control_value="control",
    ...                           context_key="cell_type", batch_key="donor")
    """
    adata = _read("kang2018_donors")
    counts = sparse.csr_matrix(adata.layers["counts"], dtype=np.float32)
    size = np.asarray(counts.sum(axis=1)).ravel()
    scaled = sparse.diags((1e4 / np.maximum(size, 1)).astype(np.float32)) @ counts
    scaled.data = np.log1p(scaled.data)
    adata.X = sparse.csr_matrix(scaled, dtype=np.float32)
    adata.uns["log1p"] = {"base": None}
    return adata


def norman2019() -> ad.AnnData:
    """PerturBench's development file: Norman 2019 K562 CRISPRa plus McFaline-Figueroa 2023 CRISPRi (5,961 x 500).

    ``X`` is log1p-normalised over 500 highly variable genes (no counts). ``obs["perturbation"]``
    holds ``control``, single genes and ``A+B`` double perturbations; ``obs["dataset"]`` is
    ``norman19`` (3,375 K562 cells: 100 controls, 18 singles, 15 doubles, about 100 cells each) or
    ``mcfaline23`` (2,586 cells: 9 kinase targets in the glioma lines A172, T98G, U87MG);
    ``obs["cell_type"]`` is the cell line. Select one part with
    ``adata[adata.obs["dataset"] == "norman19"]``.

    Provenance: repository altoslabs/perturbench, ``src/perturbench/data/resources/devel.h5ad`` at commit
    ``4dd6a03c54ef348f6be6e46e21ea7f80eb2daaa2``, copied byte for byte.
    Licence: PerturBench is BSD-3-Clause; the data are Norman et al., Science 2019 (GEO GSE133344) and
    McFaline-Figueroa et al. 2023/24.

    Examples
    --------
    >>> adata = perturbdiff_scvi.datasets.norman2019()
    >>> norman = adata[adata.obs["dataset"] == "norman19"].copy()
    """
    return _read("norman2019")
