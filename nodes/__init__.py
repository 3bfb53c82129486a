"""ComfyUI nodes: thin adapters over sliders_core. ComfyUI itself is imported only inside node methods."""

from .apply_nodes import ApplySlider, LoadSlider, SliderMixer, SliderStack
from .discover_nodes import DiscoverSliders, SelectSlider
from .image_nodes import LoadImagePairs
from .inversion_nodes import InversionSampler, LoadInversion, NullTextInvert, SaveInversion
from .model_nodes import LoadShapesModel
from .sampling_nodes import DelayedLoraSampler, SliderSweep
from .train_nodes import TrainPairSlider, TrainTextSlider

_NODES = {
    "ConceptSlidersLoadShapesModel": (LoadShapesModel, "Load Shapes Model"),
    "ConceptSlidersTrainText": (TrainTextSlider, "Train Text Slider"),
    "ConceptSlidersTrainPairs": (TrainPairSlider, "Train Pair Slider"),
    "ConceptSlidersLoadImagePairs": (LoadImagePairs, "Load Image Pairs"),
    "ConceptSlidersDiscover": (DiscoverSliders, "Discover Sliders (SliderSpace)"),
    "ConceptSlidersSelect": (SelectSlider, "Select Slider"),
    "ConceptSlidersLoad": (LoadSlider, "Load Slider"),
    "ConceptSlidersApply": (ApplySlider, "Apply Slider with Alpha"),
    "ConceptSlidersStack": (SliderStack, "Slider Stack"),
    "ConceptSlidersMixer": (SliderMixer, "Slider Mixer"),
    "ConceptSlidersDelayedSampler": (DelayedLoraSampler, "Delayed-LoRA Sampler"),
    "ConceptSlidersSweep": (SliderSweep, "Slider Sweep"),
    "ConceptSlidersNullTextInvert": (NullTextInvert, "Null-Text Invert"),
    "ConceptSlidersInversionSampler": (InversionSampler, "Inversion Sampler"),
    "ConceptSlidersSaveInversion": (SaveInversion, "Save Inversion"),
    "ConceptSlidersLoadInversion": (LoadInversion, "Load Inversion"),
}
NODE_CLASS_MAPPINGS = {key: cls for key, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {key: name for key, (_, name) in _NODES.items()}
