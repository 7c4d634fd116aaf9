"""The dataset converters' console scripts (their command lines live with them, in dataset_conversion/)."""
from dataset_conversion import btcv, isic2018, msd
from nnscd.cli import console_script

convert_msd_dataset = console_script(msd.main)  # nnUNetv2_convert_MSD_dataset's flags, its converter fixed
convert_btcv_dataset = console_script(btcv.main)
convert_isic2018_dataset = console_script(isic2018.main)
