"""The AnnData boundary: the only code that reads or writes AnnData."""

from omicvae_sc.data._disk import (
    RowReader,
    check_new_output,
    holds_disk_arrays,
    is_on_disk,
    open_dense,
    read_lazy,
    write_dense,
)
from omicvae_sc.data._loader import CountTensors, RankPart, stack_rows
from omicvae_sc.data._schema import FIELDS, SCHEMA_VERSION, Field, ResultsRecord, obs_key
from omicvae_sc.data._setup import (
    SETUP_KEY,
    AnnDataSetup,
    build_setup,
    covariate_codes,
    obs_column,
    read_setup,
)
from omicvae_sc.data._stream import (
    BLOCK_ROWS,
    BUFFER_BLOCKS,
    BlockStream,
    count_source,
    library_sizes,
)
from omicvae_sc.data._validate import (
    check_anndata_object,
    check_counts,
    checked_counts,
    get_counts,
)
from omicvae_sc.data._writeback import (
    Results,
    check_key_added,
    output_keys,
    rank_genes_groups_layout,
    write_keys,
    write_results,
    write_uns,
)

__all__ = [
    "BLOCK_ROWS",
    "BUFFER_BLOCKS",
    "FIELDS",
    "SCHEMA_VERSION",
    "SETUP_KEY",
    "AnnDataSetup",
    "BlockStream",
    "CountTensors",
    "Field",
    "RankPart",
    "Results",
    "ResultsRecord",
    "RowReader",
    "build_setup",
    "check_anndata_object",
    "check_counts",
    "check_key_added",
    "check_new_output",
    "checked_counts",
    "count_source",
    "covariate_codes",
    "get_counts",
    "holds_disk_arrays",
    "is_on_disk",
    "library_sizes",
    "obs_column",
    "obs_key",
    "open_dense",
    "output_keys",
    "rank_genes_groups_layout",
    "read_lazy",
    "read_setup",
    "stack_rows",
    "write_dense",
    "write_keys",
    "write_results",
    "write_uns",
]
